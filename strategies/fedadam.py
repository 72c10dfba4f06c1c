"""FedAdam: Adam as the server optimizer over the sites' mean delta.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv:2003.00295), Algorithm 2 with Adam's bias
correction (Kingma and Ba, ICLR 2015):

    m_t = β1·m_{t-1} + (1-β1)·Δ̄        v_t = β2·v_{t-1} + (1-β2)·Δ̄²
    x_{t+1} = x_t + η·√(1-β2^t)/(1-β1^t) · m_t / (√v_t + τ)

t counts server steps from 1. Flower 1.42's FedAdam uses the exponent ``server_round + 1`` instead of t, so its
round r equals our step t = r + 1 (the oracle test feeds Flower ``server_round = t - 1``). With
``bias_correction=False`` the step is the paper's plain η·m/(√v+τ). State: slots ``"m"`` and ``"v"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator, fold
from strategies.fedopt import adaptive_step, check_positive, check_unit_interval
from strategies.types import AggregationError, ClientUpdate, ServerState, StateDict

RULE = "fedadam"


@dataclass(frozen=True)
class FedAdamConfig:
    """Parameters of FedAdam (defaults as Flower's).

    Attributes:
        eta: Server learning rate η (> 0).
        beta_1: First-moment decay β1 in [0, 1).
        beta_2: Second-moment decay β2 in [0, 1).
        tau: Adaptivity τ (> 0), added to √v.
        initial_v: Initial second moment on the first round (>= 0; the paper suggests >= τ²).
        bias_correction: Apply Adam's bias correction to η.
    """

    eta: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    initial_v: float = 0.0
    bias_correction: bool = True

    def __post_init__(self) -> None:
        check_positive(RULE, "eta", self.eta)
        check_unit_interval(RULE, "beta_1", self.beta_1)
        check_unit_interval(RULE, "beta_2", self.beta_2)
        check_positive(RULE, "tau", self.tau)
        if not self.initial_v >= 0:
            raise AggregationError(f"{RULE}: initial_v must be >= 0, got {self.initial_v}")


def step(global_state: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor], config: FedAdamConfig,
         server_state: ServerState | None = None) -> tuple[StateDict, ServerState]:
    """One FedAdam server step given the weighted mean delta.

    Args:
        global_state: The round's global adapter.
        mean_delta: Weighted mean of the sites' deltas.
        config: FedAdam parameters.
        server_state: The previous round's state, or ``None`` on the first round.

    Returns:
        ``(new_global_state, new_server_state)``.

    Raises:
        AggregationError: If ``server_state`` belongs to another rule or adapter layout.
    """
    b2 = config.beta_2
    return adaptive_step(RULE, global_state, mean_delta, server_state, eta=config.eta, beta_1=config.beta_1,
                         tau=config.tau, initial_v=config.initial_v,
                         second_moment=lambda v, d2: b2 * v + (1.0 - b2) * d2,
                         adam_beta_2=b2 if config.bias_correction else None)


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedAdamConfig = FedAdamConfig(),
              server_state: ServerState | None = None) -> tuple[StateDict, ServerState]:
    """Aggregate one round with FedAdam.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (consumed once, one at a time).
        config: FedAdam parameters.
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
