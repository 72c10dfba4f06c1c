"""Hand-worked examples for the classic, server-optimizer and robust rules, and the clipping filter."""

from __future__ import annotations

import math

import pytest
import torch
from agg_helpers import updates_from

from strategies import (
    clipping,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    krum,
    median,
    multikrum,
    trimmed_mean,
)
from strategies.types import AggregationError, ServerState

K = "w"


def _g(*vals: float) -> dict[str, torch.Tensor]:
    return {K: torch.tensor(vals, dtype=torch.float64)}


def _ups(*rows: tuple[float, ...], weights: list[int] | None = None) -> list:
    return updates_from([_g(*r) for r in rows], weights=weights)


def test_fedavg_weighted_mean_by_hand() -> None:
    # (1·2 + 3·6) / 4 = 5, applied with server_lr 0.5 to 10 -> 12.5
    out = fedavg.aggregate(_g(10.0), _ups((2.0,), (6.0,), weights=[1, 3]), fedavg.FedAvgConfig(server_lr=0.5))
    assert out[K].tolist() == [12.5]


def test_fedavgm_two_rounds_by_hand() -> None:
    # round 1: v = 1, x = 0 + 1 = 1; round 2: v = 0.9·1 + 1 = 1.9, x = 1 + 1.9 = 2.9
    cfg = fedavgm.FedAvgMConfig(server_lr=1.0, momentum=0.9)
    x1, s1 = fedavgm.aggregate(_g(0.0), _ups((1.0,)), cfg)
    x2, s2 = fedavgm.aggregate(x1, _ups((1.0,)), cfg, s1)
    assert x1[K].item() == pytest.approx(1.0)
    assert x2[K].item() == pytest.approx(2.9)
    assert s2.tensors["momentum"][K].item() == pytest.approx(1.9)
    assert (s1.step, s2.step) == (1, 2)


def test_fedadam_first_step_by_hand() -> None:
    # Δ̄ = 0.5: m = 0.05, v = 0.0025, √v = 0.05; η_1 = 0.1·√(1-0.99)/(1-0.9) = 0.1; x = 0.1·0.05/0.051
    x, s = fedadam.aggregate(_g(0.0), _ups((0.5,)))
    assert x[K].item() == pytest.approx(0.1 * 0.05 / 0.051, rel=1e-12)
    assert s.tensors["m"][K].item() == pytest.approx(0.05)
    assert s.tensors["v"][K].item() == pytest.approx(0.0025)
    x_nb, _ = fedadam.aggregate(_g(0.0), _ups((0.5,)), fedadam.FedAdamConfig(bias_correction=False))
    assert x_nb[K].item() == pytest.approx(0.1 * 0.05 / 0.051, rel=1e-12)  # η_1 happens to be η here
    x2, _ = fedadam.aggregate(x, _ups((0.5,)), fedadam.FedAdamConfig(), s)
    x2_nb, _ = fedadam.aggregate(x, _ups((0.5,)), fedadam.FedAdamConfig(bias_correction=False),
                                 ServerState("fedadam", s.step, s.tensors))
    assert x2[K].item() != pytest.approx(x2_nb[K].item())


def test_fedyogi_and_fedadagrad_first_step_by_hand() -> None:
    # Yogi from v=0: v = 0 − 0.01·0.25·sign(0 − 0.25) = 0.0025; m = 0.05; x = 0.01·0.05/(0.05 + 0.001)
    x, _ = fedyogi.aggregate(_g(0.0), _ups((0.5,)))
    assert x[K].item() == pytest.approx(0.01 * 0.05 / 0.051, rel=1e-12)
    # Adagrad, β1 = 0: m = 0.5, v = 0.25; x = 0.1·0.5/(0.5 + 0.001)
    x, s = fedadagrad.aggregate(_g(0.0), _ups((0.5,)))
    assert x[K].item() == pytest.approx(0.1 * 0.5 / 0.501, rel=1e-12)
    _, s2 = fedadagrad.aggregate(x, _ups((0.5,)), fedadagrad.FedAdagradConfig(), s)
    assert s2.tensors["v"][K].item() == pytest.approx(0.5)


def test_server_state_round_trips_through_flat_tensors_and_resumes_exactly() -> None:
    x1, s1 = fedadam.aggregate(_g(0.0, 1.0), _ups((0.5, -0.2), (0.1, 0.3)))
    restored = ServerState.from_flat("fedadam", s1.to_flat())
    a, sa = fedadam.aggregate(x1, _ups((0.2, 0.2)), fedadam.FedAdamConfig(), s1)
    b, sb = fedadam.aggregate(x1, _ups((0.2, 0.2)), fedadam.FedAdamConfig(), restored)
    assert torch.equal(a[K], b[K]) and sa.step == sb.step == 2


def test_median_even_count_takes_the_mean_of_the_middle_pair() -> None:
    out = median.aggregate(_g(0.0, 0.0), _ups((1.0, 5.0), (2.0, 6.0), (10.0, 7.0), (3.0, -100.0)))
    assert out[K].tolist() == [2.5, 5.5]


def test_median_ignores_weights_and_outliers() -> None:
    out = median.aggregate(_g(1.0), _ups((1.0,), (2.0,), (1e9,), weights=[100, 1, 1]))
    assert out[K].tolist() == [3.0]


def test_trimmed_mean_by_hand() -> None:
    # beta 0.2 of 5 cuts 1 at each end: mean(2, 3, 4) = 3
    out = trimmed_mean.aggregate(_g(0.0), _ups((1.0,), (100.0,), (2.0,), (3.0,), (4.0,)))
    assert out[K].tolist() == [3.0]


def test_krum_rejects_the_outlier_and_multikrum_averages_the_closest() -> None:
    # Prepare: four close updates and one far away.
    ups = _ups((0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1), (50.0, -50.0), weights=[1, 1, 1, 1, 1])
    # Execute
    state, chosen = krum.aggregate_with_selection(_g(0.0, 0.0), ups, krum.KrumConfig(num_malicious=1))
    multi, chosen_m = multikrum.aggregate_with_selection(
        _g(0.0, 0.0), ups, multikrum.MultiKrumConfig(num_malicious=1, num_selected=4))
    # Assert
    assert chosen[0] != "site4" and len(chosen) == 1
    assert state[K].tolist() == ups[int(chosen[0][-1])].delta[K].tolist()  # Krum publishes the chosen update
    assert sorted(chosen_m) == ["site0", "site1", "site2", "site3"]
    assert multi[K].tolist() == pytest.approx([0.05, 0.05])


def test_krum_scores_by_hand() -> None:
    # 1-D points 0, 1, 3, 10, 11 with f=0: each score sums the 3 nearest squared distances.
    ups = _ups((0.0,), (1.0,), (3.0,), (10.0,), (11.0,))
    assert multikrum.krum_scores(ups, 0) == pytest.approx([1 + 9 + 100, 1 + 4 + 81, 9 + 4 + 49, 1 + 49 + 81,
                                                           1 + 64 + 100])


def test_krum_ties_break_by_site_name() -> None:
    ups = updates_from([_g(1.0), _g(1.0), _g(1.0)])
    ups = [ups[2], ups[0], ups[1]]
    assert krum.aggregate_with_selection(_g(0.0), ups, krum.KrumConfig())[1] == ["site0"]


def test_krum_refuses_too_few_updates() -> None:
    with pytest.raises(AggregationError, match=r"2f \+ 3 = 5"):
        krum.aggregate(_g(0.0), _ups((1.0,), (2.0,), (3.0,), (4.0,)), krum.KrumConfig(num_malicious=1))
    with pytest.raises(AggregationError, match="num_selected=5 exceeds"):
        multikrum.aggregate(_g(0.0), _ups((1.0,), (2.0,), (3.0,), (4.0,), (5.0,)),
                            multikrum.MultiKrumConfig(num_malicious=1, num_selected=5))


def test_clipping_scales_to_the_bound_and_leaves_small_updates_alone() -> None:
    # Prepare
    big, small = updates_from([{"a": torch.tensor([3.0]), "b": torch.tensor([4.0])},
                               {"a": torch.tensor([0.3]), "b": torch.tensor([0.4])}])
    cfg = clipping.ClipConfig(max_norm=1.0)
    # Execute
    clipped = clipping.clip_update(big, cfg)
    untouched = clipping.clip_update(small, cfg)
    # Assert
    assert clipped.delta["a"].tolist() == pytest.approx([0.6]) and clipped.delta["b"].tolist() == pytest.approx([0.8])
    assert clipped.metadata["pre_clip_norm"] == pytest.approx(5.0)
    assert untouched is small
    assert big.delta["a"].tolist() == [3.0]  # the input is not modified
    assert clipping.l2_norm(clipped.delta) == pytest.approx(1.0)


def test_clipping_refuses_non_finite_updates_and_bad_bounds() -> None:
    (bad,) = updates_from([{"a": torch.tensor([math.inf])}])
    with pytest.raises(AggregationError, match="site0"):
        clipping.clip_update(bad, clipping.ClipConfig(max_norm=1.0))
    with pytest.raises(AggregationError, match="max_norm"):
        clipping.ClipConfig(max_norm=0.0)


def test_rules_refuse_mismatched_or_missing_updates() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        fedavg.aggregate(_g(0.0), [])
    with pytest.raises(AggregationError, match="no updates"):
        fedavg.aggregate(_g(0.0), iter([]))
    with pytest.raises(AggregationError, match="shape"):
        fedadam.aggregate(_g(0.0), _ups((1.0, 2.0)))
    with pytest.raises(AggregationError, match="keys differ"):
        median.aggregate(_g(0.0), updates_from([{"other": torch.zeros(1, dtype=torch.float64)}]))


def test_stateful_rules_refuse_foreign_or_misshapen_state() -> None:
    _, adam_state = fedadam.aggregate(_g(0.0), _ups((1.0,)))
    with pytest.raises(AggregationError, match="produced by 'fedadam'"):
        fedyogi.aggregate(_g(0.0), _ups((1.0,)), fedyogi.FedYogiConfig(), adam_state)
    with pytest.raises(AggregationError, match="shape"):
        fedadam.aggregate(_g(0.0, 1.0), _ups((1.0, 1.0)), fedadam.FedAdamConfig(), adam_state)
    _, m_state = fedavgm.aggregate(_g(0.0), _ups((1.0,)))
    with pytest.raises(AggregationError, match="slots"):
        fedavgm.aggregate(_g(0.0), _ups((1.0,)), fedavgm.FedAvgMConfig(), ServerState("fedavgm", 1, {"m": {}}))
    assert m_state.rule == "fedavgm"


@pytest.mark.parametrize(("build", "fragment"), [
    (lambda: fedavg.FedAvgConfig(server_lr=0.0), "fedavg: server_lr"),
    (lambda: fedavgm.FedAvgMConfig(momentum=1.0), "fedavgm: momentum"),
    (lambda: fedadam.FedAdamConfig(beta_2=1.5), "fedadam: beta_2"),
    (lambda: fedadam.FedAdamConfig(tau=0.0), "fedadam: tau"),
    (lambda: fedyogi.FedYogiConfig(eta=-1.0), "fedyogi: eta"),
    (lambda: fedadagrad.FedAdagradConfig(initial_v=-1.0), "fedadagrad: initial_v"),
    (lambda: trimmed_mean.TrimmedMeanConfig(beta=0.5), "trimmed_mean: beta"),
    (lambda: krum.KrumConfig(num_malicious=-1), "krum: num_malicious"),
    (lambda: multikrum.MultiKrumConfig(num_selected=0), "multikrum: num_selected"),
])
def test_configs_check_their_fields(build: object, fragment: str) -> None:
    with pytest.raises(AggregationError, match=fragment):
        build()  # type: ignore[operator]


def test_released_accumulator_refuses_reuse() -> None:
    acc = fedavg.FedAvgAccumulator(_g(0.0))
    acc.add(_ups((1.0,))[0])
    out = acc.apply_to(_g(1.0), release=True)
    assert out[K].tolist() == [2.0]
    with pytest.raises(AggregationError, match="released"):
        acc.apply_to(_g(1.0))
    with pytest.raises(AggregationError, match="released"):
        acc.add(_ups((1.0,))[0])
