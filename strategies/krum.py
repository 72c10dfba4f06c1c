"""Krum: keep the single update closest to its N − f − 2 nearest neighbours.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017.

Krum is Multi-Krum with m = 1 (see :mod:`strategies.multikrum` for the scoring and the documented differences from
Flower 1.42's Krum). The rule needs every update at once (batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies import multikrum
from strategies.types import AggregationError, ClientUpdate, StateDict

RULE = "krum"


@dataclass(frozen=True)
class KrumConfig:
    """Parameters of Krum.

    Attributes:
        num_malicious: f, the number of Byzantine sites tolerated (>= 0); needs N >= 2f + 3 at aggregation.
    """

    num_malicious: int = 0

    def __post_init__(self) -> None:
        if self.num_malicious < 0:
            raise AggregationError(f"{RULE}: num_malicious must be >= 0, got {self.num_malicious}")


def aggregate_with_selection(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
                             config: KrumConfig) -> tuple[StateDict, list[str]]:
    """Like :func:`aggregate`, also returning the selected site."""
    return multikrum.aggregate_with_selection(
        global_state, updates, multikrum.MultiKrumConfig(num_malicious=config.num_malicious, num_selected=1))


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: KrumConfig = KrumConfig()) -> StateDict:
    """New global state = global + the Krum-selected delta.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (all needed at once).
        config: Krum parameters.

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates, mismatched keys/shapes or N < 2f + 3.
    """
    return aggregate_with_selection(global_state, updates, config)[0]
