"""The merged model is written in the base's stored dtype: a bf16 base gives BF16 safetensors, on both merge paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.release.merge import merge_adapter, merge_to_dir
from coordinator.rounds.adapter import init_adapter


def _dtypes(out: Path) -> set[str]:
    found = set()
    for f in out.glob("*.safetensors"):
        raw = f.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def _bf16_base(src: Path, dst: Path) -> Path:
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16).save_pretrained(dst)
    return dst


def test_merged_model_keeps_the_bf16_base_dtype(tiny_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    base = _bf16_base(tiny_model_dir, tmp_path / "bf16")
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    init = init_adapter(base, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), wire_dtype="bfloat16"))
    assert {t.dtype for t in init.spec.tensors} == {"BF16"}
    state = {k: (v.float() + 0.01).to(torch.bfloat16) for k, v in init.state.items()}  # B != 0: the merge changes W
    merge_to_dir(base, state, rank=4, alpha=8.0, out_dir=tmp_path / "stream")
    assert _dtypes(tmp_path / "stream") == {"BF16"}
    # PEFT's in-memory fallback (taken when tensor names do not follow the modules) writes the base's dtype too.
    from coordinator.release import merge as merge_mod

    def refuse(*a: object, **k: object) -> None:
        raise merge_mod.MergeError("forced fallback")

    monkeypatch.setattr(merge_mod, "merge_to_dir", refuse)
    assert merge_adapter(base, init.spec, state, tmp_path / "peft") is None
    assert _dtypes(tmp_path / "peft") == {"BF16"}
