"""Flower 1.42's strategies as the oracle for the classic rules.

Flower aggregates WEIGHTS, we aggregate DELTAS, so every test compares Flower(global + Δ_i) with
ours(global, Δ_i). Both sides get the same numbers; the inputs are float64 (Flower keeps the dtype it is given),
so any difference above 1e-6 is an algorithmic one. Documented differences, handled in the tests:

* FedAdam: Flower's bias correction uses ``server_round + 1`` where Adam uses the step count t, so our step t equals
  Flower's round t - 1.
* Krum/Multi-Krum: we refuse N < 2f + 3 and break ties by site name; the inputs here are within Krum's domain and
  have distinct scores, where both agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from agg_helpers import assert_state_close, flat_state, updates_from

from strategies import (
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedyogi,
    krum,
    median,
    multikrum,
    trimmed_mean,
)
from strategies.types import ClientUpdate, StateDict

flwr_app = pytest.importorskip("flwr.app")
flwr_strategy = pytest.importorskip("flwr.serverapp.strategy")

ATOL = 1e-6
SHAPES = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (3, 7),
          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (6, 3),
          "base_model.model.score.weight": (4,)}


@pytest.fixture(autouse=True, scope="module")
def _task_identity() -> Iterator[None]:
    """Flower refuses to build a Message outside a running app unless the task identity is set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _round(seed: int, n: int, dtype: torch.dtype = torch.float64) -> tuple[StateDict, list[ClientUpdate]]:
    g = flat_state(seed, SHAPES, dtype=dtype)
    deltas = [flat_state(seed * 100 + i + 1, SHAPES, scale=0.1, dtype=dtype) for i in range(n)]
    return g, updates_from(deltas, weights=[3 + 2 * i for i in range(n)])


def _replies(global_state: StateDict, updates: list[ClientUpdate]) -> list[object]:
    """Flower reply Messages carrying each site's WEIGHTS (global + Δ_i) and its example count."""
    msgs = []
    for i, u in enumerate(updates):
        arrays = flwr_app.ArrayRecord({k: flwr_app.Array(np.asarray((g + u.delta[k]).numpy()))
                                       for k, g in global_state.items()})
        content = flwr_app.RecordDict({"arrays": arrays,
                                       "metrics": flwr_app.MetricRecord({"num-examples": u.num_examples})})
        msgs.append(flwr_app.Message(content=content, dst_node_id=i + 1, message_type=flwr_app.MessageType.TRAIN))
    return msgs


def _to_torch(record: object) -> StateDict:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}  # type: ignore[attr-defined]


def _flower(strategy: object, global_state: StateDict, updates: list[ClientUpdate], server_round: int = 1
            ) -> StateDict:
    arrays, _ = strategy.aggregate_train(server_round, _replies(global_state, updates))  # type: ignore[attr-defined]
    return _to_torch(arrays)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fedavg_matches_flower(dtype: torch.dtype) -> None:
    # Prepare
    g, ups = _round(1, 5, dtype)
    # Execute
    ours = fedavg.aggregate(g, ups)
    ref = _flower(flwr_strategy.FedAvg(), g, ups)
    # Assert
    assert ours["base_model.model.score.weight"].dtype == dtype
    assert_state_close(ours, ref, atol=ATOL)


def test_fedprox_server_side_matches_flower() -> None:
    g, ups = _round(2, 4)
    ours = fedprox.aggregate(g, ups, fedprox.FedProxConfig(mu=0.1))
    ref = _flower(flwr_strategy.FedProx(proximal_mu=0.1), g, ups)
    assert_state_close(ours, ref, atol=ATOL)


def test_fedavgm_matches_flower_over_three_rounds() -> None:
    # Prepare: Flower keeps its own current weights from round to round; we pass the state explicitly.
    g, _ = _round(3, 1)
    ref = flwr_strategy.FedAvgM(server_learning_rate=0.7, server_momentum=0.9)
    ref.current_arrays = flwr_app.ArrayRecord({k: flwr_app.Array(v.numpy().copy()) for k, v in g.items()})
    config = fedavgm.FedAvgMConfig(server_lr=0.7, momentum=0.9)
    state = None
    for r in range(1, 4):
        _, ups = _round(30 + r, 4)
        # Execute
        new, state = fedavgm.aggregate(g, ups, config, state)
        ref_new = _flower(ref, g, ups, server_round=r)
        # Assert
        assert_state_close(new, ref_new, atol=ATOL)
        assert state.step == r
        g = new


@pytest.mark.parametrize(("ours_mod", "ours_config", "ref_cls", "ref_kwargs", "round_offset"), [
    (fedadam, fedadam.FedAdamConfig(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2), "FedAdam",
     {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}, -1),
    (fedyogi, fedyogi.FedYogiConfig(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2), "FedYogi",
     {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}, 0),
    (fedadagrad, fedadagrad.FedAdagradConfig(eta=0.05, tau=1e-2), "FedAdagrad", {"eta": 0.05, "tau": 1e-2}, 0),
])
def test_fedopt_matches_flower_over_three_rounds(ours_mod: object, ours_config: object, ref_cls: str,
                                                 ref_kwargs: dict[str, float], round_offset: int) -> None:
    # Prepare
    g, _ = _round(4, 1)
    ref = getattr(flwr_strategy, ref_cls)(**ref_kwargs)
    state = None
    for t in range(1, 4):
        _, ups = _round(40 + t, 5)
        # Flower's configure_train records the round's weights; do the same by hand.
        ref.current_arrays = {k: v.numpy().copy() for k, v in g.items()}
        # Execute
        new, state = ours_mod.aggregate(g, ups, ours_config, state)  # type: ignore[attr-defined]
        ref_new = _flower(ref, g, ups, server_round=t + round_offset)
        # Assert
        assert_state_close(new, ref_new, atol=ATOL)
        assert state.step == t
        g = new


def test_fedadam_differs_from_flower_by_exactly_the_documented_round_offset() -> None:
    # The offset is real: feeding Flower round t (not t - 1) gives a different first step.
    g, ups = _round(5, 3)
    ref = flwr_strategy.FedAdam()
    ref.current_arrays = {k: v.numpy().copy() for k, v in g.items()}
    new, _ = fedadam.aggregate(g, ups)
    ref_new = _flower(ref, g, ups, server_round=1)
    diff = max(float((new[k] - ref_new[k]).abs().max()) for k in new)
    assert diff > 1e-3


@pytest.mark.parametrize("n", [5, 4])
def test_median_matches_flower(n: int) -> None:
    g, ups = _round(6 + n, n)
    ours = median.aggregate(g, ups)
    ref = _flower(flwr_strategy.FedMedian(), g, ups)
    assert_state_close(ours, ref, atol=ATOL)


@pytest.mark.parametrize(("n", "beta"), [(6, 0.2), (7, 0.3), (5, 0.0)])
def test_trimmed_mean_matches_flower(n: int, beta: float) -> None:
    g, ups = _round(8 + n, n)
    ours = trimmed_mean.aggregate(g, ups, trimmed_mean.TrimmedMeanConfig(beta=beta))
    ref = _flower(flwr_strategy.FedTrimmedAvg(beta=beta), g, ups)
    assert_state_close(ours, ref, atol=ATOL)


def test_krum_matches_flower() -> None:
    g, ups = _round(12, 6)
    ours = krum.aggregate(g, ups, krum.KrumConfig(num_malicious=1))
    ref = _flower(flwr_strategy.Krum(num_malicious_nodes=1), g, ups)
    assert_state_close(ours, ref, atol=ATOL)


def test_multikrum_matches_flower() -> None:
    g, ups = _round(13, 7)
    ours = multikrum.aggregate(g, ups, multikrum.MultiKrumConfig(num_malicious=1, num_selected=3))
    ref = _flower(flwr_strategy.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3), g, ups)
    assert_state_close(ours, ref, atol=ATOL)
