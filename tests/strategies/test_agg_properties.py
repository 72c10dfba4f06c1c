"""Property tests (hypothesis) over every registered rule: permutation invariance, identical updates, weight
normalisation, LoRA exactness against the dense mean(B_i A_i), and mixed-rank rules on equal ranks."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from agg_helpers import adapter, assert_state_close, clone, fedsb_adapter, lora_keys, updates_from
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import fedavg, fedex_lora, ffa_lora, flexlora, flora, hetlora
from strategies.error_meter import aggregation_error_from_updates
from strategies.lora import pairs_of, product, site_factors
from strategies.registry import build_strategy, list_strategies
from strategies.types import AggregationResult, ClientUpdate, StateDict

SETTINGS = settings(max_examples=20, deadline=None)
PARAMS: dict[str, dict[str, object]] = {"multikrum": {"num_selected": 2}, "flexlora": {"fold_residual": True},
                                        "trimmed_mean": {"beta": 0.2}}
# Rules whose result for N identical updates is not "global + that update": the adaptive server optimizers take
# a normalised step m / (√v + τ), not the mean delta.
NOT_IDENTITY = {"fedadam", "fedyogi", "fedadagrad"}


def _problem(seed: int, n: int, rank: int = 2, frozen_a: bool = False, fed_sb: bool = False
             ) -> tuple[StateDict, list[StateDict]]:
    if fed_sb:  # a Fed-SB adapter is R matrices only (B and A are fixed and never travel)
        return fedsb_adapter(seed, rank=rank), [fedsb_adapter(seed * 1000 + i + 1, rank=rank, scale=0.3)
                                                for i in range(n)]
    g = adapter(seed, rank=rank, extra=True)
    deltas = []
    for i in range(n):
        d = adapter(seed * 1000 + i + 1, rank=rank, extra=True, scale=0.3)
        if frozen_a:
            d = {k: torch.zeros_like(v) if ".lora_A." in k else v for k, v in d.items()}
        deltas.append(d)
    return g, deltas


def _run(name: str, g: StateDict, ups: list[ClientUpdate]) -> AggregationResult:
    return build_strategy(name, PARAMS.get(name, {})).aggregate(g, ups)


def _assert_results_close(a: AggregationResult, b: AggregationResult, atol: float = 1e-9) -> None:
    assert_state_close(a.state, b.state, atol=atol)
    assert_state_close(a.base_residual, b.base_residual, atol=1e-6)
    assert (a.server_state is None) == (b.server_state is None)
    if a.server_state is not None and b.server_state is not None:
        for slot, sd in a.server_state.tensors.items():
            assert_state_close(dict(sd), dict(b.server_state.tensors[slot]), atol=atol)


def _dense_mean(g: StateDict, ups: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Σ w_i B_i A_i per module, computed the slow obvious way."""
    total = sum(u.num_examples for u in ups)
    out = {}
    for p in pairs_of(g)[0]:
        acc = torch.zeros(g[p.b_key].shape[0], g[p.a_key].shape[1], dtype=torch.float64)
        for u in ups:
            b, a = site_factors(g, u.delta, p)
            acc += (u.num_examples / total) * (b @ a)
        out[p.base_weight] = acc
    return out


def _published(state: StateDict, residual: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {p.base_weight: product(state, p) + residual.get(p.base_weight, torch.zeros(())).to(torch.float64)
            for p in pairs_of(state)[0]}


@SETTINGS
@given(name=st.sampled_from(list_strategies()), seed=st.integers(0, 10_000), n=st.integers(3, 6),
       perm_seed=st.integers(0, 10_000))
def test_permutation_invariance(name: str, seed: int, n: int, perm_seed: int) -> None:
    # Prepare
    g, deltas = _problem(seed, n, frozen_a=name == "ffa_lora", fed_sb=name == "fed_sb")
    ups = updates_from(deltas, weights=[1 + (seed + 3 * i) % 7 for i in range(n)])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    # Execute
    a = _run(name, g, ups)
    b = _run(name, g, [ups[i] for i in perm])
    # Assert
    _assert_results_close(a, b)


@SETTINGS
@given(name=st.sampled_from(sorted(set(list_strategies()) - NOT_IDENTITY)), seed=st.integers(0, 10_000),
       n=st.integers(3, 6), weights=st.lists(st.integers(1, 50), min_size=6, max_size=6))
def test_identical_updates_give_that_update(name: str, seed: int, n: int, weights: list[int]) -> None:
    # Prepare
    g, deltas = _problem(seed, 1, frozen_a=name == "ffa_lora", fed_sb=name == "fed_sb")
    ups = updates_from([deltas[0]] * n, weights=weights[:n])
    want = {k: g[k] + deltas[0][k] for k in g}
    # Execute
    r = _run(name, g, ups)
    # Assert: the published model is exactly that site's model, whatever the rule stores in factors or residual.
    want_products = {p.base_weight: product(want, p) for p in pairs_of(g)[0]}
    got_products = _published(r.state, r.base_residual)
    for k, v in want_products.items():
        torch.testing.assert_close(got_products[k], v, atol=1e-6, rtol=0)
    if name not in ("flora", "flexlora"):  # these two re-factorise B A
        assert_state_close(r.state, want, atol=1e-9)


@SETTINGS
@given(name=st.sampled_from(list_strategies()), seed=st.integers(0, 10_000), n=st.integers(3, 6),
       factor=st.integers(2, 9))
def test_weights_normalise(name: str, seed: int, n: int, factor: int) -> None:
    # Prepare: the same relative weights at two scales.
    g, deltas = _problem(seed, n, frozen_a=name == "ffa_lora", fed_sb=name == "fed_sb")
    w = [1 + (seed + 5 * i) % 4 for i in range(n)]
    # Execute
    a = _run(name, g, updates_from(deltas, weights=w))
    b = _run(name, g, updates_from(deltas, weights=[factor * x for x in w]))
    # Assert
    _assert_results_close(a, b)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), dup=st.integers(0, 5))
def test_fedavg_weight_is_a_count_of_examples(seed: int, n: int, dup: int) -> None:
    # A site with weight 2 counts like the same site twice with weight 1.
    g, deltas = _problem(seed, n)
    i = dup % n
    w = [1] * n
    w[i] = 2
    a = fedavg.aggregate(g, updates_from(deltas, weights=w))
    b = fedavg.aggregate(g, updates_from([*deltas, deltas[i]], weights=[1] * (n + 1)))
    assert_state_close(a, b, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), rank=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ffa_and_fedex_match_the_dense_mean(seed: int, n: int, rank: int, dtype: torch.dtype) -> None:
    # Prepare
    g, deltas = _problem(seed, n, rank=rank)
    g = {k: v.to(dtype) for k, v in g.items()}
    ups = updates_from([{k: v.to(dtype) for k, v in d.items()} for d in deltas])
    g_ffa, d_ffa = _problem(seed, n, rank=rank, frozen_a=True)
    ups_ffa = updates_from(d_ffa)
    # Execute
    fedex_state, fedex_res = fedex_lora.aggregate(g, ups)
    ffa_state = ffa_lora.aggregate(g_ffa, ups_ffa)
    # Assert
    want, got = _dense_mean(g, ups), _published(fedex_state, fedex_res)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    want, got = _dense_mean(g_ffa, ups_ffa), _published(ffa_state, {})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    assert max(aggregation_error_from_updates(g, ups, fedex_state, fedex_res).values()) < 1e-5


@SETTINGS
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 4), min_size=2, max_size=5))
def test_flora_and_flexlora_fold_are_exact_for_mixed_ranks(seed: int, ranks: list[int]) -> None:
    # Prepare: global rank 4, sites of ranks r_i <= 4.
    g = adapter(seed, rank=4)
    deltas = []
    for i, r in enumerate(ranks):
        d = adapter(seed * 1000 + i + 1, rank=r, scale=0.3)
        deltas.append(d)
    ups = updates_from(deltas)
    want = _dense_mean(g, ups)
    # Execute
    fl_state, fl_res = flora.aggregate(g, ups)
    fx_state, fx_res = flexlora.aggregate(g, ups, flexlora.FlexLoraConfig(fold_residual=True))
    # Assert
    for state, res in ((fl_state, fl_res), (fx_state, fx_res)):
        got = _published(state, res)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in g.items()}


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), rank=st.integers(1, 3),
       mode=st.sampled_from(["all", "holders"]))
def test_hetlora_on_equal_ranks_is_fedavg(seed: int, n: int, rank: int, mode: str) -> None:
    g, deltas = _problem(seed, n, rank=rank)
    ups = updates_from(deltas)
    got = hetlora.aggregate(g, ups, hetlora.HetLoraConfig(average_over=mode))
    assert_state_close(got, fedavg.aggregate(g, ups), atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), rank=st.integers(1, 3))
def test_flexlora_on_equal_ranks_publishes_what_fedex_publishes(seed: int, n: int, rank: int) -> None:
    # Same model after folding; without folding, FlexLoRA keeps the best rank-r part (Eckart–Young).
    g, deltas = _problem(seed, n, rank=rank)
    ups = updates_from(deltas)
    fx_state, fx_res = flexlora.aggregate(g, ups, flexlora.FlexLoraConfig(fold_residual=True))
    ex_state, ex_res = fedex_lora.aggregate(g, ups)
    a, b = _published(fx_state, fx_res), _published(ex_state, ex_res)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    nofold, _ = flexlora.aggregate(g, ups)
    for k, target in _dense_mean(g, ups).items():
        s = torch.linalg.svdvals(target)
        best = float(s[rank:].square().sum().sqrt())
        p = next(p for p in pairs_of(g)[0] if p.base_weight == k)
        torch.testing.assert_close(float(torch.linalg.matrix_norm(target - product(nofold, p))), best,
                                   atol=1e-8, rtol=1e-6)


@SETTINGS
@given(name=st.sampled_from(list_strategies()), seed=st.integers(0, 10_000), n=st.integers(3, 5))
def test_no_rule_mutates_its_inputs(name: str, seed: int, n: int) -> None:
    g, deltas = _problem(seed, n, frozen_a=name == "ffa_lora", fed_sb=name == "fed_sb")
    g0, d0 = clone(g), [clone(d) for d in deltas]
    r = _run(name, g, updates_from(deltas))
    assert_state_close(g, g0, atol=0)
    for d, d_before in zip(deltas, d0, strict=True):
        assert_state_close(d, d_before, atol=0)
    # The result shares no storage with the inputs, so a caller mutating it cannot corrupt them either.
    for k, v in r.state.items():
        assert v.untyped_storage().data_ptr() != g[k].untyped_storage().data_ptr()


def test_naive_fedavg_is_measurably_inexact_where_fedex_is_exact() -> None:
    # The point of the LoRA-exact rules: on heterogeneous sites, averaging factors is off by far more than 1e-5.
    g, deltas = _problem(7, 4)
    ups = updates_from(deltas)
    naive = max(aggregation_error_from_updates(g, ups, fedavg.aggregate(g, ups)).values())
    state, res = fedex_lora.aggregate(g, ups)
    exact = max(aggregation_error_from_updates(g, ups, state, res).values())
    assert naive > 1e-2
    assert exact < 1e-6
    a_key, _ = lora_keys(0, "self_attn.q_proj")
    assert a_key in state
