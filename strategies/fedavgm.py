"""FedAvgM: FedAvg with server momentum.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", arXiv:1909.06335, 2019.

    v_t = μ·v_{t-1} + Δ̄          (v_0 = 0, so the first round's v is Δ̄)
    x_{t+1} = x_t + η·v_t

Δ̄ is the example-weighted mean delta. This is Flower's FedAvgM with the pseudo-gradient's sign flipped (Flower uses
x_t − FedAvg(weights) = −Δ̄). The momentum lives in an explicit :class:`ServerState` (slot ``"momentum"``).
The rule is linear in the updates and streams (see :class:`strategies.protocol.MeanDeltaAccumulator`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator, fold
from strategies.fedopt import check_positive, check_state, check_unit_interval, state_dtype
from strategies.types import AggregationError, ClientUpdate, ServerState, StateDict

RULE = "fedavgm"


@dataclass(frozen=True)
class FedAvgMConfig:
    """Parameters of FedAvgM.

    Attributes:
        server_lr: Server learning rate η (> 0).
        momentum: Server momentum μ in [0, 1).
    """

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_positive(RULE, "server_lr", self.server_lr)
        check_unit_interval(RULE, "momentum", self.momentum)


def step(global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor], config: FedAvgMConfig,
         server_state: ServerState | None = None) -> tuple[StateDict, ServerState]:
    """One FedAvgM server step given the weighted mean delta.

    Args:
        global_state: The round's global adapter.
        mean_delta: Weighted mean of the sites' deltas.
        config: FedAvgM parameters.
        server_state: The previous round's state, or ``None`` on the first round.

    Returns:
        ``(new_global_state, new_server_state)``.

    Raises:
        AggregationError: If ``server_state`` belongs to another rule or adapter layout.
    """
    if server_state is not None:
        check_state(RULE, server_state, global_state, ("momentum",))
    new_state: StateDict = {}
    momentum: StateDict = {}
    for k, g in global_state.items():
        v = mean_delta[k].to(torch.float64)
        if server_state is not None:
            v = v + config.momentum * server_state.tensors["momentum"][k].to(torch.float64)
        new_state[k] = (g.detach().to(torch.float64) + config.server_lr * v).to(g.dtype)
        momentum[k] = v.to(state_dtype(g))
    prev = server_state.step if server_state is not None else 0
    return new_state, ServerState(rule=RULE, step=prev + 1, tensors={"momentum": momentum})


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedAvgMConfig = FedAvgMConfig(),
              server_state: ServerState | None = None) -> tuple[StateDict, ServerState]:
    """Aggregate one round with FedAvgM.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (consumed once, one at a time).
        config: FedAvgM parameters.
        server_state: The previous round's state, or ``None`` on the first round.

    Returns:
        ``(new_global_state, new_server_state)``; inputs are not modified.

    Raises:
        AggregationError: On no updates, mismatched keys/shapes or a foreign server state.
    """
    acc = FedAvgAccumulator(global_state)
    fold(acc, updates)
    if acc.count == 0:
        raise AggregationError(f"{RULE}: no updates to aggregate")
    return step(global_state, acc.lazy_mean(), config, server_state)
