"""FedProx: FedAvg whose sites add a proximal term (μ/2)·||w − w_global||² to their local loss.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (arXiv:1812.06127).

The proximal term is applied by the site trainer, so the server side is plain FedAvg. The rule carries μ so the
coordinator can send it with the task (``site_params``), as Flower's FedProx injects ``proximal-mu`` into the
training config.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies import fedavg
from strategies.fedopt import check_positive
from strategies.types import AggregationError, ClientUpdate, StateDict

RULE = "fedprox"


@dataclass(frozen=True)
class FedProxConfig:
    """Parameters of FedProx.

    Attributes:
        mu: Proximal coefficient μ (>= 0) the site trainer applies; 0 makes the sites plain FedAvg sites.
        server_lr: Step size applied to the averaged delta (1.0 is plain averaging).
    """

    mu: float = 0.01
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.mu >= 0:
            raise AggregationError(f"{RULE}: mu must be >= 0, got {self.mu}")
        check_positive(RULE, "server_lr", self.server_lr)


def site_params(config: FedProxConfig) -> dict[str, float]:
    """What the site trainer needs: ``{"proximal_mu": mu}``."""
    return {"proximal_mu": config.mu}


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedProxConfig = FedProxConfig()) -> StateDict:
    """Aggregate one round: example-weighted FedAvg of the deltas (the proximal term acted at the sites).

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates.
        config: FedProx parameters.

    Returns:
        The new global adapter state.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes.
    """
    return fedavg.aggregate(global_state, updates, fedavg.FedAvgConfig(server_lr=config.server_lr))
