"""``[lora] compression = "int8"`` end to end: real coordinator and 2 real site processes over mTLS, 2 rounds.

Every stored update holds only the encoded tensors (``.q`` I8 and ``.absmax`` F32), about a quarter of the float32
bytes; the global adapter downloads compressed (``compress_download``) while the stored one stays float32; each site
keeps its error-feedback residual of the last round in its work_dir; the federation publishes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from coordinator.rounds.store import Store
from fedcommon import tensors
from fedcommon.auditlog import read_records
from sandbox import localfed
from site_agent.egress.feedback import DIRNAME


def _header(path: Path) -> dict[str, dict]:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {k: v for k, v in header.items() if k != "__metadata__"}


def test_an_int8_federation_sends_encoded_updates_and_publishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=2, rounds=2,
                           training={"max_steps": 2, "batch_size": 2, "learning_rate": 3e-3},
                           lora={"rank": 8, "alpha": 16.0, "target_modules": ["all-linear"], "compression": "int8",
                                 "compression_block_size": 64, "compress_download": True},
                           n_train=8, n_heldout=2)
    with fed:
        codes = fed.run_all(timeout=300)
    assert codes == {"site-a": 0, "site-b": 0, "coordinator": 0}, (codes, fed.diagnostics())
    store = Store(fed.state_dir)
    dense = _header(store.adapter_path(1))
    assert {v["dtype"] for v in dense.values()} == {"F32"}  # the stored global adapter stays full precision
    fp32 = len(tensors.encode_state(tensors.decode_state(store.adapter_path(1).read_bytes())))
    for r in (1, 2):
        updates = store.updates(r)
        assert sorted(u.site for u in updates) == ["site-a", "site-b"]
        for u in updates:
            header = _header(Path(u.path))
            assert set(header) == {f"{k}.q" for k in dense} | {f"{k}.absmax" for k in dense}
            assert {v["dtype"] for k, v in header.items() if k.endswith(".q")} == {"I8"}
            ratio = Path(u.path).stat().st_size / fp32
            assert ratio < 0.3, ratio
    assert store.adapter_path(3).read_bytes() != store.adapter_path(1).read_bytes()
    final = tensors.decode_state(store.adapter_path(3).read_bytes())
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
    for s in fed.sites:  # the residual of round 2 (built on round 1's) is what is left; round 1's was removed
        kept = sorted(p.name[:11] for p in (fed.root / "sites" / s.name / "work" / DIRNAME).rglob("*.safetensors"))
        assert kept == ["r0000000001", "r0000000002"], kept
    assert "model_published" in {r["event"] for r in read_records(fed.state_dir / "audit.jsonl")}
