"""Coordinate-wise trimmed mean of the sites' deltas.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018.

For each coordinate, drop the ``int(beta * N)`` smallest and largest values and average the rest, unweighted, as
Flower 1.42's FedTrimmedAvg (and ``scipy.stats.trim_mean``). The rule needs every update at once (batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.median import stacked
from strategies.types import AggregationError, ClientUpdate, StateDict, check_compatible

RULE = "trimmed_mean"


@dataclass(frozen=True)
class TrimmedMeanConfig:
    """Parameters of the trimmed mean.

    Attributes:
        beta: Fraction cut from EACH end, in [0, 0.5) (Flower's default 0.2).
    """

    beta: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise AggregationError(f"{RULE}: beta must be in [0, 0.5), got {self.beta}")


def trimmed_mean(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Trimmed mean along dim 0 in float64, cutting ``int(beta * N)`` values at each end."""
    n = x.shape[0]
    cut = int(beta * n)
    s = torch.sort(x, dim=0).values
    return s[cut:n - cut].to(torch.float64).mean(dim=0)


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: TrimmedMeanConfig = TrimmedMeanConfig()) -> StateDict:
    """New global state = global + coordinate-wise trimmed mean of the deltas.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (all needed at once).
        config: Trimmed-mean parameters.

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes.
    """
    ups = list(updates)
    check_compatible(global_state, ups)
    return {k: (g.detach().to(torch.float64) + trimmed_mean(stacked(ups, k), config.beta)).to(g.dtype)
            for k, g in global_state.items()}
