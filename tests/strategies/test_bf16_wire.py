"""A bfloat16 wire adapter: rules sum bf16 updates in float32 and return the global in bf16; SecAgg takes bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcommon import secagg as sa
from strategies.registry import build_strategy
from strategies.types import ClientUpdate


def _state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(4, 32, generator=g).to(dtype),
            "m.lora_B.weight": (torch.randn(32, 4, generator=g) * 1e-2).to(dtype)}


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedavgm"])
def test_bf16_aggregation_matches_fp32_within_bf16_rounding(name: str) -> None:
    glob = _state(0, torch.bfloat16)
    # Many small deltas: a bf16 accumulator would lose them; float32 sums keep the mean to fp32 precision.
    deltas = [_state(10 + i, torch.bfloat16) for i in range(16)]
    ups16 = [ClientUpdate(f"s{i}", d, 1 + i) for i, d in enumerate(deltas)]
    ups32 = [ClientUpdate(u.site, {k: v.float() for k, v in u.delta.items()}, u.num_examples) for u in ups16]
    out16 = build_strategy(name, {}).aggregate(glob, ups16, None).state
    out32 = build_strategy(name, {}).aggregate({k: v.float() for k, v in glob.items()}, ups32, None).state
    for k in glob:
        assert out16[k].dtype == torch.bfloat16
        # The bf16 result is the fp32 result rounded once: within one bf16 step (2^-8 relative).
        assert torch.allclose(out16[k].float(), out32[k], rtol=2 ** -8, atol=1e-30), k


def test_fedavg_of_known_bf16_values() -> None:
    glob = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    ups = [ClientUpdate("a", {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)}, 1),
           ClientUpdate("b", {"w": torch.tensor([3.0, 4.0, 5.0], dtype=torch.bfloat16)}, 3)]
    out = build_strategy("fedavg", {}).aggregate(glob, ups, None).state["w"]
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.5, 3.5, 4.5]


def test_secagg_fixed_point_takes_bf16_deltas() -> None:
    delta = _state(1, torch.bfloat16)
    spec = [(k, tuple(v.shape)) for k, v in sorted(delta.items())]
    vec = sa.flatten_weighted(delta, spec, 2.0)
    assert vec.dtype == np.float64 and vec[-1] == 2.0
    back = sa.unflatten(vec[:-1] / 2.0, spec)
    assert all(torch.equal(back[k], delta[k].float()) for k in delta)
