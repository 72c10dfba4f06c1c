"""Coordinate-wise median of the sites' deltas.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018.

Unweighted, as in the paper and in Flower 1.42's FedMedian; an even number of updates takes the mean of the two
middle values (``numpy.median``'s convention, not ``torch.median``'s lower one). The rule needs every update at once
(batch); memory is O(N × largest tensor) on top of the inputs because it works one key at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.types import ClientUpdate, StateDict, check_compatible

RULE = "median"


@dataclass(frozen=True)
class MedianConfig:
    """FedMedian has no parameters; the dataclass keeps the config interface uniform."""


def stacked(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    """Stack one key of every update into ``[N, *shape]``, in the updates' dtype promoted to at least float32."""
    dtype = torch.promote_types(updates[0].delta[key].dtype, torch.float32)
    return torch.stack([u.delta[key].detach().to(dtype) for u in updates])


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 in float64; the mean of the two middle values when dim 0 is even."""
    n = x.shape[0]
    s = torch.sort(x, dim=0).values
    if n % 2 == 1:
        return s[n // 2].to(torch.float64)
    return (s[n // 2 - 1].to(torch.float64) + s[n // 2].to(torch.float64)) / 2.0


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: MedianConfig = MedianConfig()) -> StateDict:
    """New global state = global + coordinate-wise median of the deltas.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (all needed at once).
        config: Unused; kept for a uniform interface.

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes.
    """
    ups = list(updates)
    check_compatible(global_state, ups)
    return {k: (g.detach().to(torch.float64) + coordinate_median(stacked(ups, k))).to(g.dtype)
            for k, g in global_state.items()}
