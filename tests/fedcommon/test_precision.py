"""Precision and placement of the base: the decisions are pure functions of the device, tested with fake devices;
the CPU load of a bf16-stored base is real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedcommon.models import (
    load_base,
    load_dtype,
    load_plan,
    stored_dtype,
    trainer_precision_args,
    training_precision,
)


@pytest.mark.parametrize(("cuda", "bf16", "want"), [(True, True, "bf16"), (True, False, "fp16"), (False, False, "fp32"),
                                                     (False, True, "fp32")])
def test_training_precision_follows_the_device(cuda: bool, bf16: bool, want: str) -> None:
    assert training_precision(cuda, bf16) == want
    args = trainer_precision_args(cuda, bf16)
    assert args == {"use_cpu": not cuda, "bf16": want == "bf16", "fp16": want == "fp16"}


@pytest.mark.parametrize(("stored", "cuda", "bf16", "want"), [
    (torch.bfloat16, False, False, torch.float32),  # CPU: half precision is upcast for training compute
    (torch.float16, False, False, torch.float32),
    (torch.float32, False, False, torch.float32),
    (None, False, False, torch.float32),
    (torch.bfloat16, True, True, torch.bfloat16),  # CUDA: the stored dtype is kept
    (torch.bfloat16, True, False, torch.float16),  # a GPU without bf16 computes in fp16
    (torch.float16, True, True, torch.float16),
    (torch.float32, True, True, torch.float32),
])
def test_load_dtype(stored: torch.dtype | None, cuda: bool, bf16: bool, want: torch.dtype) -> None:
    assert load_dtype(stored, cuda, bf16) == want


def test_load_plan_device_map_and_qlora_compute() -> None:
    # device_map only on CUDA; a plain CPU load names none
    assert load_plan(torch.bfloat16, False, True, True, "auto") == {"dtype": torch.bfloat16, "device_map": "auto"}
    assert load_plan(torch.bfloat16, False, True, True) == {"dtype": torch.bfloat16}
    assert load_plan(torch.bfloat16, False, False, False, "auto") == {"dtype": torch.float32}
    # QLoRA: bf16 compute on a bf16 GPU, fp16 on an older one, fp32 on CPU
    assert load_plan(None, True, True, True) == {"compute_dtype": torch.bfloat16, "dtype": torch.float32,
                                                 "device_map": "auto"}
    assert load_plan(None, True, True, False, "balanced")["compute_dtype"] == torch.float16
    assert load_plan(None, True, True, False, "balanced")["device_map"] == "balanced"
    assert load_plan(None, True, False, False, "auto") == {"compute_dtype": torch.float32, "dtype": torch.float32,
                                                          "device_map": "cpu"}


@pytest.mark.parametrize(("config", "want"), [({"dtype": "bfloat16"}, torch.bfloat16),
                                              ({"torch_dtype": "float16"}, torch.float16),
                                              ({"torch_dtype": "torch.bfloat16"}, torch.bfloat16),
                                              ({"dtype": "float32", "torch_dtype": "bfloat16"}, torch.float32),
                                              ({}, None), ({"dtype": "int3"}, None)])
def test_stored_dtype_reads_the_config(tmp_path: Path, config: dict[str, str], want: torch.dtype | None) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert stored_dtype(tmp_path) == want
    assert stored_dtype(tmp_path / "missing") is None


def bf16_base(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose weights (and config) are stored in bfloat16."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(dst)
    return dst


def test_a_bf16_stored_base_loads_in_fp32_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = bf16_base(tiny_model_dir, tmp_path / "bf16")
    assert stored_dtype(base) == torch.bfloat16
    model = load_base(base, cuda=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

