"""FedAdagrad: Adagrad as the server optimizer over the sites' mean delta.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2:

    m_t = β1·m_{t-1} + (1-β1)·Δ̄        v_t = v_{t-1} + Δ̄²
    x_{t+1} = x_t + η · m_t / (√v_t + τ)

Flower 1.42's FedAdagrad fixes β1 = 0 and starts v at 0; those are our defaults. State: slots ``"m"`` and ``"v"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator, fold
from strategies.fedopt import adaptive_step, check_positive, check_unit_interval
from strategies.types import AggregationError, ClientUpdate, ServerState, StateDict

RULE = "fedadagrad"


@dataclass(frozen=True)
class FedAdagradConfig:
    """Parameters of FedAdagrad (defaults as Flower's).

    Attributes:
        eta: Server learning rate η (> 0).
        beta_1: First-moment decay β1 in [0, 1) (Flower fixes 0).
        tau: Adaptivity τ (> 0), added to √v.
        initial_v: Initial accumulator on the first round (>= 0; the paper suggests >= τ²).
    """

    eta: float = 0.1
    beta_1: float = 0.0
    tau: float = 1e-3
    initial_v: float = 0.0

    def __post_init__(self) -> None:
        check_positive(RULE, "eta", self.eta)
        check_unit_interval(RULE, "beta_1", self.beta_1)
        check_positive(RULE, "tau", self.tau)
        if not self.initial_v >= 0:
            raise AggregationError(f"{RULE}: initial_v must be >= 0, got {self.initial_v}")


def step(global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor], config: FedAdagradConfig,
         server_state: ServerState | None = None) -> tuple[StateDict, ServerState]:
    """One FedAdagrad server step given the weighted mean delta.

    Args:
        global_state: The round's global adapter.
        mean_delta: Weighted mean of the sites' deltas.
        config: FedAdagrad parameters.
        server_state: The previous round's state, or ``None`` on the first round.

    Returns:
        ``(new_global_state, new_server_state)``.

    Raises:
        AggregationError: If ``server_state`` belongs to another rule or adapter layout.
    """
    return adaptive_step(RULE, global_state, mean_delta, server_state, eta=config.eta, beta_1=config.beta_1,
                         tau=config.tau, initial_v=config.initial_v, second_moment=lambda v, d2: v + d2)


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedAdagradConfig = FedAdagradConfig(),
              server_state: ServerState | None = None) -> tuple[StateDict, ServerState]:
    """Aggregate one round with FedAdagrad.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (consumed once, one at a time).
        config: FedAdagrad parameters.
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
