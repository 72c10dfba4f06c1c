"""Hand-worked examples and refusals for the LoRA-aware rules, the LoRA helpers and the aggregation-error meter."""

from __future__ import annotations

import math

import pytest
import torch
from agg_helpers import adapter, base_name, lora_keys, updates_from

from strategies import fedavg, fedex_lora, ffa_lora, flexlora, flora, hetlora
from strategies.error_meter import aggregation_error, aggregation_error_from_updates
from strategies.lora import split_keys, truncate_rank
from strategies.types import AggregationError, ClientUpdate

A, B = lora_keys(0, "self_attn.q_proj")
BASE = base_name(0, "self_attn.q_proj")


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _one(b: float, a: float) -> dict[str, torch.Tensor]:
    return {A: _t([[a]]), B: _t([[b]])}


def test_keys_pair_up_and_name_the_base_weight() -> None:
    pairs, other = split_keys([A, B, "base_model.model.lm_head.weight",
                               "base_model.model.model.layers.1.mlp.up_proj.lora_A.default.weight",
                               "base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"])
    assert [p.base_weight for p in pairs] == [BASE, "model.layers.1.mlp.up_proj.weight"]
    assert other == ["base_model.model.lm_head.weight"]
    with pytest.raises(AggregationError, match="without both"):
        split_keys([A])
    with pytest.raises(AggregationError, match="embedding"):
        split_keys(["base_model.model.embed_tokens.lora_embedding_A"])


def test_error_meter_by_hand() -> None:
    # Sites (B, A) = (2, 1) and (0, 3), equal weights: mean(BA) = 1, but B̄Ā = 1·2 = 2 -> error |1-2|/1 = 1.
    sites = [_one(2.0, 1.0), _one(0.0, 3.0)]
    naive = {A: _t([[2.0]]), B: _t([[1.0]])}
    assert aggregation_error(naive, sites, [1.0, 1.0]) == {BASE: pytest.approx(1.0)}
    # Folding the residual -1 into the base makes the published model exact.
    assert aggregation_error(naive, sites, [1.0, 1.0], {BASE: _t([[-1.0]])}) == {BASE: 0.0}
    # A zero target with a non-zero published product has unbounded relative error.
    assert aggregation_error(naive, [_one(0.0, 1.0)], [1.0]) == {BASE: math.inf}


def test_fedex_by_hand_and_meter_agrees() -> None:
    # Prepare: the same two sites as deltas from a zero global.
    g = _one(0.0, 0.0)
    ups = updates_from([_one(2.0, 1.0), _one(0.0, 3.0)], weights=[1, 1])
    # Execute
    state, residual = fedex_lora.aggregate(g, ups)
    # Assert
    assert (state[B].item(), state[A].item()) == (1.0, 2.0)
    assert residual[BASE].tolist() == [[-1.0]] and residual[BASE].dtype == torch.float32
    assert aggregation_error_from_updates(g, ups, fedavg.aggregate(g, ups)) == {BASE: pytest.approx(1.0)}
    assert aggregation_error_from_updates(g, ups, state, residual) == {BASE: 0.0}


def test_fedex_residual_is_against_the_published_cast() -> None:
    # In float32 the published factors are rounded; the residual must absorb that rounding too.
    g = {k: v.to(torch.float32) for k, v in adapter(1, rank=3, dims=(16, 12)).items()}
    ups = updates_from([{k: v.to(torch.float32) for k, v in adapter(i + 2, rank=3, dims=(16, 12)).items()}
                        for i in range(3)])
    state, residual = fedex_lora.aggregate(g, ups, fedex_lora.FedExLoraConfig(residual_dtype="float64"))
    err = aggregation_error_from_updates(g, ups, state, residual)
    assert max(err.values()) < 1e-14


def test_ffa_refuses_a_changed_a() -> None:
    g = adapter(1)
    d = {k: torch.zeros_like(v) if ".lora_A." in k else v for k, v in adapter(2).items()}
    bad = dict(d)
    bad[A] = d[A].clone()
    bad[A][0, 0] = 1e-12
    with pytest.raises(AggregationError, match=r"ffa_lora: update from site 'site1' changes frozen lora_A"):
        ffa_lora.aggregate(g, updates_from([d, bad]))
    assert ffa_lora.site_params(ffa_lora.FFALoraConfig()) == {"freeze_lora_A": True}
    out = ffa_lora.aggregate(g, updates_from([d, d]))
    assert torch.equal(out[A], g[A])


def test_lora_rules_refuse_an_adapter_without_lora_pairs() -> None:
    g = {"w": torch.zeros(2)}
    with pytest.raises(AggregationError, match="no lora_A/lora_B pairs"):
        ffa_lora.aggregate(g, updates_from([{"w": torch.ones(2)}]))
    with pytest.raises(AggregationError, match="no lora_A/lora_B pairs"):
        fedex_lora.aggregate(g, updates_from([{"w": torch.ones(2)}]))


def test_flora_stacks_with_weights_on_a_and_merges_by_default() -> None:
    # Prepare: zero global of rank 1, two rank-1 sites with weights 1 and 3.
    g = _one(0.0, 0.0)
    ups = updates_from([_one(2.0, 1.0), _one(4.0, 5.0)], weights=[1, 3])
    # Execute
    stacked = flora.stack(g, ups)
    kept, none = flora.aggregate(g, ups, flora.FLoraConfig(max_rank=2))
    merged, residual = flora.aggregate(g, ups)
    # Assert: B = [2 4], A = [0.25·1; 0.75·5]; B A = 0.5 + 15 = 15.5 = 0.25·2 + 0.75·20
    assert stacked[B].tolist() == [[2.0, 4.0]] and stacked[A].tolist() == [[0.25], [3.75]]
    assert none == {} and torch.equal(kept[B], stacked[B])
    assert residual[BASE].tolist() == [[15.5]]
    assert merged[B].tolist() == [[0.0]] and merged[A].tolist() == [[0.0]]


def test_hetlora_pads_low_rank_deltas_by_hand() -> None:
    # Prepare: global rank 2 (zeros), a rank-2 site and a rank-1 site with equal weights.
    g = {A: torch.zeros(2, 1, dtype=torch.float64), B: torch.zeros(1, 2, dtype=torch.float64)}
    full = {A: _t([[2.0], [4.0]]), B: _t([[6.0, 8.0]])}
    low = ClientUpdate(site="low", delta={A: _t([[1.0]]), B: _t([[3.0]])}, num_examples=1,
                       metadata={"lora_rank": 1})
    ups = [ClientUpdate(site="full", delta=full, num_examples=1), low]
    # Execute
    padded = hetlora.aggregate(g, ups)
    holders = hetlora.aggregate(g, ups, hetlora.HetLoraConfig(average_over="holders"))
    # Assert: component 1 is held by one site only: (4 + 0)/2 = 2 vs 4/1 = 4.
    assert padded[A].tolist() == [[1.5], [2.0]] and padded[B].tolist() == [[4.5, 4.0]]
    assert holders[A].tolist() == [[1.5], [4.0]] and holders[B].tolist() == [[4.5, 8.0]]
    assert hetlora.for_site(padded, 1)[A].tolist() == [[1.5]]


def test_mixed_rank_rules_refuse_bad_ranks() -> None:
    g = adapter(1, rank=2)
    too_big = adapter(2, rank=3)
    with pytest.raises(AggregationError, match=r"1 <= r <= 2"):
        hetlora.aggregate(g, updates_from([too_big]))
    lying = ClientUpdate(site="s", delta=adapter(3, rank=1), num_examples=1, metadata={"lora_rank": 2})
    with pytest.raises(AggregationError, match="declared lora_rank 2"):
        flexlora.aggregate(g, [lying])
    with pytest.raises(AggregationError, match="cannot truncate rank 2 to 3"):
        truncate_rank(g, 3)


def test_flexlora_projects_to_the_best_low_rank_and_sites_get_prefixes() -> None:
    # Prepare: two orthogonal rank-1 sites with weights 3 and 1 -> mean product has singular values 3/4·s1, 1/4·s2.
    g = {A: torch.zeros(2, 3, dtype=torch.float64), B: torch.zeros(3, 2, dtype=torch.float64)}
    s1 = {A: _t([[1.0, 0.0, 0.0]]), B: _t([[2.0], [0.0], [0.0]])}
    s2 = {A: _t([[0.0, 1.0, 0.0]]), B: _t([[0.0], [1.0], [0.0]])}
    ups = updates_from([s1, s2], weights=[3, 1])
    # Execute
    state, residual = flexlora.aggregate(g, ups)
    site_view = flexlora.for_site(state, 1)
    # Assert: the rank-2 global holds both exactly; a rank-1 site receives the dominant one (1.5 at [0, 0]).
    assert residual == {}
    torch.testing.assert_close(state[B] @ state[A], _t([[1.5, 0, 0], [0, 0.25, 0], [0, 0, 0]]))
    torch.testing.assert_close(site_view[B] @ site_view[A], _t([[1.5, 0, 0], [0, 0, 0], [0, 0, 0]]))
    assert site_view[A].shape == (1, 3) and site_view[B].shape == (3, 1)


@pytest.mark.parametrize("rule", ["fedavg", "hetlora-exact"])
def test_error_meter_from_factors_matches_the_dense_products(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large modules are measured from their factors (Gram matrices), never forming the d x k products; that must
    give the dense meter's figure: a real error under FedAvg, and (near) zero where the published product is the
    sites' mean exactly (one site)."""
    from strategies import error_meter

    g = torch.Generator().manual_seed(3)
    d, k, r = 96, 80, 4
    glob = {"m.lora_A.weight": torch.randn(r, k, generator=g), "m.lora_B.weight": torch.randn(d, r, generator=g)}
    n_sites = 3 if rule == "fedavg" else 1
    ups = [ClientUpdate(site=f"s{i}", num_examples=10 * (i + 1),
                        delta={kk: 0.1 * torch.randn(v.shape, generator=g) for kk, v in glob.items()})
           for i in range(n_sites)]
    published = fedavg.aggregate(glob, ups)
    monkeypatch.setattr(error_meter, "FACTORED_MIN_ELEMENTS", 1 << 40)  # dense
    dense = aggregation_error_from_updates(glob, ups, published)["m.weight"]
    monkeypatch.setattr(error_meter, "FACTORED_MIN_ELEMENTS", 1)  # from the factors
    factored = aggregation_error_from_updates(glob, ups, published)["m.weight"]
    if n_sites > 1:
        assert dense > 1e-3 and factored == pytest.approx(dense, rel=1e-6)
    else:
        assert dense < 1e-6 and factored < 1e-6
    full = [{kk: glob[kk] + u.delta[kk] for kk in glob} for u in ups]
    assert aggregation_error(published, full, [u.num_examples for u in ups])["m.weight"] == pytest.approx(
        factored, rel=1e-6, abs=1e-6)
