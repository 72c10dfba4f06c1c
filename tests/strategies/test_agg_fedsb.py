"""Fed-SB: exactness of averaging R against the mean of the dense products, fixed factors, expansion, refusals."""

from __future__ import annotations

import pytest
import torch
from agg_helpers import MODULES, PREFIX, adapter, fedsb_adapter, updates_from

from strategies import fedsb
from strategies.registry import build_strategy
from strategies.types import AggregationError, ClientUpdate

SHAPES = {f"{PREFIX}.0.{m}": (6, 5) for m in MODULES}  # module -> (out, in)


def test_averaged_r_gives_exactly_the_mean_of_the_sites_products() -> None:
    # Prepare: 4 heterogeneous sites, unequal weights, rank 3.
    g = fedsb_adapter(1, rank=3)
    deltas = [fedsb_adapter(10 + i, rank=3, scale=0.5) for i in range(4)]
    ups = updates_from(deltas, weights=[1, 7, 2, 5])
    total = sum(u.num_examples for u in ups)
    # Execute
    new = build_strategy("fed-sb").aggregate(g, ups).state
    # Assert: B mean(R_i) A == mean(B R_i A), the dense product each site's model adds to its weight.
    published = fedsb.expand(new, SHAPES, dtype=torch.float64)
    for module, (out_f, in_f) in SHAPES.items():
        b, a = fedsb.fixed_factors(module, out_f, in_f, 3)
        b, a = b.double(), a.double()
        k = fedsb.r_key(module)
        want = sum((u.num_examples / total) * (b @ (g[k] + u.delta[k]) @ a) for u in ups)
        got = published[module + ".lora_B.weight"] @ published[module + ".lora_A.weight"]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert torch.equal(published[module + ".lora_A.weight"], a)


def test_fixed_factors_are_orthonormal_reproducible_and_distinct_per_module() -> None:
    # Execute
    b1, a1 = fedsb.fixed_factors("m.q", 40, 30, 8)
    b2, a2 = fedsb.fixed_factors("m.q", 40, 30, 8)
    b3, _ = fedsb.fixed_factors("m.k", 40, 30, 8)
    # Assert: the same bits wherever computed; orthonormal columns of B and rows of A; another module differs.
    assert torch.equal(b1, b2) and torch.equal(a1, a2)
    assert b1.shape == (40, 8) and a1.shape == (8, 30) and b1.dtype == torch.float32
    torch.testing.assert_close(b1.T @ b1, torch.eye(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(a1 @ a1.T, torch.eye(8), atol=1e-6, rtol=0)
    assert not torch.allclose(b1, b3)
    with pytest.raises(AggregationError, match="cannot take rank 9"):
        fedsb.fixed_factors("m.q", 40, 8, 9)


def test_zero_state_has_one_zero_r_per_module_and_payload_does_not_grow_with_sites() -> None:
    # Prepare: a PEFT layout of rank 4.
    layout = {f"{PREFIX}.0.{m}.lora_{w}.weight": ((4, 5) if w == "A" else (6, 4)) for m in MODULES for w in "AB"}
    # Execute
    state = fedsb.zero_state(layout)
    ups = updates_from([fedsb_adapter(i, rank=4) for i in range(5)])
    new = build_strategy("fed_sb").aggregate(state, ups).state
    # Assert
    assert {k: tuple(v.shape) for k, v in state.items()} == {f"{PREFIX}.0.{m}.lora_R.weight": (4, 4) for m in MODULES}
    assert not any(bool(v.any()) for v in state.values())
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}


def test_refuses_a_plain_lora_adapter_and_an_update_with_factors() -> None:
    # A plain LoRA global (the federation was not started for Fed-SB) is refused, naming the strategy to use.
    with pytest.raises(AggregationError, match="start the federation with strategy 'fed-sb'"):
        build_strategy("fed_sb").aggregate(adapter(1), updates_from([adapter(2)]))
    # A site that sends B or A besides R is refused, naming the site.
    g = fedsb_adapter(1)
    bad = {**fedsb_adapter(2), f"{PREFIX}.0.{MODULES[0]}.lora_A.weight": torch.zeros(2, 5, dtype=torch.float64)}
    with pytest.raises(AggregationError, match="site 'evil'.*only the lora_R"):
        build_strategy("fed_sb").aggregate(g, [ClientUpdate("evil", bad, 1)])


def test_expand_refuses_a_module_the_base_does_not_have() -> None:
    with pytest.raises(AggregationError, match="not an adapted module"):
        fedsb.expand({"x.lora_R.weight": torch.zeros(2, 2)}, SHAPES)
