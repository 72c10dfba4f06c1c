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


def _dense_errors(glob: dict[str, torch.Tensor], ups: list[ClientUpdate], published: dict[str, torch.Tensor],
                  residual: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """The meter's definition computed the plain way: form every d x k product in float64."""
    total = sum(u.num_examples for u in ups)
    out = {}
    for a_key in (k for k in glob if ".lora_A." in k):
        b_key, name = a_key.replace(".lora_A.", ".lora_B."), a_key.replace(".lora_A.weight", ".weight")
        target = sum(u.num_examples / total * (glob[b_key][:, :u.delta[a_key].shape[0]].double() + u.delta[b_key].double())
                     @ (glob[a_key][:u.delta[a_key].shape[0]].double() + u.delta[a_key].double()) for u in ups)
        pub = published[b_key].double() @ published[a_key].double() + (residual or {}).get(name, 0.0)
        out[name] = float(torch.linalg.matrix_norm(target - pub) / torch.linalg.matrix_norm(target))
    return out


def _meter_case(n_sites: int, ranks: tuple[int, ...] = (), dyadic: bool = False
                ) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    """A global adapter of modules in three shapes (several of each, as a model's layers) and its sites' updates;
    ``ranks`` gives a rank per site (HetLoRA-style) below the global's 6. ``dyadic`` rounds every value to a multiple
    of 1/8, so that the float32 sums global + delta are exact."""
    g = torch.Generator().manual_seed(3)

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        x = scale * torch.randn(*shape, generator=g)
        return torch.round(x * 8) / 8 if dyadic else x

    shapes = [(96, 80), (40, 80), (80, 200)] * 3
    glob = {}
    for i, (d, k) in enumerate(shapes):
        glob[f"m{i}.lora_A.weight"] = draw(6, k)
        glob[f"m{i}.lora_B.weight"] = draw(d, 6)
    ups = []
    for i in range(n_sites):
        r = ranks[i] if ranks else 6
        delta = {k: draw(*(v[:r].shape if ".lora_A." in k else v[:, :r].shape), scale=0.1 if not dyadic else 1.0)
                 for k, v in glob.items()}
        ups.append(ClientUpdate(site=f"s{i}", num_examples=10 * (i + 1), delta=delta))
    return glob, ups


@pytest.mark.parametrize("batch_elements", [1 << 25, 1])  # every module of a shape in one batch, or one per batch
def test_error_meter_matches_the_dense_products(batch_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The meter stacks modules of one shape and measures them from their factors (Gram matrices, never the d x k
    products); per module it must give the figure of the dense definition, mixed ranks and residuals included."""
    from strategies import error_meter

    monkeypatch.setattr(error_meter, "BATCH_ELEMENTS", batch_elements)
    glob, ups = _meter_case(3)
    published = fedavg.aggregate(glob, ups)
    got, want = aggregation_error_from_updates(glob, ups, published), _dense_errors(glob, ups, published)
    assert list(got) == list(want) and min(want.values()) > 1e-3
    assert got == {k: pytest.approx(v, rel=1e-9) for k, v in want.items()}
    full = [{k: glob[k].double() + u.delta[k].double() for k in glob} for u in ups]  # the sums the reference used
    assert aggregation_error(published, full, [u.num_examples for u in ups]) == {
        k: pytest.approx(v, rel=1e-9) for k, v in want.items()}
    # HetLoRA ranks (sites below the global's rank) and dense residuals on some modules.
    glob, ups = _meter_case(3, ranks=(2, 6, 4))
    state = hetlora.aggregate(glob, ups)
    residual = {"m0.weight": 0.01 * torch.ones(96, 80), "m4.weight": 0.02 * torch.ones(40, 80)}
    got, want = aggregation_error_from_updates(glob, ups, state, residual), _dense_errors(glob, ups, state, residual)
    assert got == {k: pytest.approx(v, rel=1e-9) for k, v in want.items()}


def test_error_meter_reports_an_exact_mean_at_float64_rounding() -> None:
    """Where the published product IS the sites' mean exactly (one site, float32 sums without rounding), the error
    is zero to float64 rounding. Where the mean is exact up to float32 rounding, the figure is that rounding (about
    4e-8), as the dense definition gives it: the Gram form alone cancels there (its own rounding is about 1e-8 of the
    target), so such modules are measured again from QR factors."""
    glob, ups = _meter_case(1, dyadic=True)
    published = {k: glob[k] + ups[0].delta[k] for k in glob}  # exact: every value is a multiple of 1/8
    assert max(aggregation_error_from_updates(glob, ups, published).values()) < 1e-13
    glob, ups = _meter_case(1)
    published = fedavg.aggregate(glob, ups)
    got, want = aggregation_error_from_updates(glob, ups, published), _dense_errors(glob, ups, published)
    assert 1e-9 < max(want.values()) < 1e-6 and got == {k: pytest.approx(v, rel=1e-6) for k, v in want.items()}
    # FedEx-LoRA's residual makes a 3-site round exact too (dense modules): the same float32-rounding figure.
    glob, ups = _meter_case(3)
    state, residual = fedex_lora.aggregate(glob, ups)
    got, want = aggregation_error_from_updates(glob, ups, state, residual), _dense_errors(glob, ups, state, residual)
    assert max(want.values()) < 1e-6 and got == {k: pytest.approx(v, rel=1e-6) for k, v in want.items()}
