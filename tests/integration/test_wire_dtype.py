"""``[lora] wire_dtype = "bfloat16"`` end to end: real coordinator and 2 real site processes over mTLS, 1 round.

The adapter crosses the wire and is stored in bfloat16 both ways: the initial and the new global adapter, and every
site's stored update, hold only BF16 tensors, about half the bytes of the same tensors in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from coordinator.rounds.store import Store
from fedcommon import tensors
from sandbox import localfed


def _dtypes(path: Path) -> set[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _fp32_bytes(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k).to(torch.float32) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    return len(tensors.encode_state(state))


def test_a_bfloat16_wire_federation_stores_and_sends_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=2, rounds=1,
                           training={"max_steps": 2, "batch_size": 2, "learning_rate": 3e-3},
                           lora={"rank": 8, "alpha": 16.0, "target_modules": ["all-linear"], "wire_dtype": "bfloat16"},
                           n_train=8, n_heldout=2)
    with fed:
        codes = fed.run_all(timeout=300)
    assert codes == {"site-a": 0, "site-b": 0, "coordinator": 0}, (codes, fed.diagnostics())
    store = Store(fed.state_dir)
    updates = store.updates(1)
    assert sorted(u.site for u in updates) == ["site-a", "site-b"]
    files = [Path(u.path) for u in updates] + [store.adapter_path(1), store.adapter_path(2)]
    ratios = []
    for path in files:
        assert _dtypes(path) == {"BF16"}, path
        ratios.append(path.stat().st_size / _fp32_bytes(path))
    print(f"bf16/fp32 bytes: {[round(r, 4) for r in ratios]}")
    assert all(0.45 < r < 0.55 for r in ratios), ratios
    # The round trained: the new global adapter differs from the initial one.
    assert store.adapter_path(2).read_bytes() != store.adapter_path(1).read_bytes()
