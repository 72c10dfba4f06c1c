"""FedAvg: example-weighted average of the sites' updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

Applied to LoRA deltas this averages A and B separately; the product of the means is not the mean of the products
(see the LoRA-exact rules). The rule is linear, so it also streams: :class:`FedAvgAccumulator` folds one update at a
time and keeps memory at O(adapter size) whatever the number of sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.types import AggregationError, ClientUpdate, StateDict, check_compatible


@dataclass(frozen=True)
class FedAvgConfig:
    """Parameters of FedAvg.

    Attributes:
        server_lr: Step size applied to the averaged delta (1.0 is plain FedAvg).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise AggregationError(f"fedavg: server_lr must be > 0, got {self.server_lr}")


class FedAvgAccumulator:
    """Streaming weighted sum of deltas, accumulated in float64 for order-independent results."""

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self._shapes = {k: tuple(v.shape) for k, v in template.items()}
        self._sum: dict[str, torch.Tensor] = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in template.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Fold one update in (checks keys and shapes against the template)."""
        check_compatible(_shape_stub(self._shapes), [update])
        w = float(update.num_examples)
        for k, v in update.delta.items():
            self._sum[k].add_(v.detach().to(torch.float64), alpha=w)
        self.total_weight += w
        self.count += 1

    def mean(self) -> StateDict:
        """The weighted mean delta so far (float64)."""
        if self.count == 0:
            raise AggregationError("fedavg: no updates accumulated")
        return {k: v / self.total_weight for k, v in self._sum.items()}


def _shape_stub(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def apply_delta(global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lr: float = 1.0) -> StateDict:
    """Return ``global + lr * delta`` in each global tensor's dtype, without mutating either input."""
    return {k: (g.detach().to(torch.float64) + lr * delta[k].to(torch.float64)).to(g.dtype) for k, g in global_state.items()}


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
              config: FedAvgConfig = FedAvgConfig()) -> StateDict:
    """New global state = global + server_lr * Σ n_i Δ_i / Σ n_i.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The accepted DIFF updates of the round.
        config: FedAvg parameters.

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes.
    """
    check_compatible(global_state, list(updates))
    acc = FedAvgAccumulator(global_state)
    for u in updates:
        acc.add(u)
    return apply_delta(global_state, acc.mean(), config.server_lr)
