"""Norm-bound clipping filter, usable before any rule.

Each update's delta is scaled by min(1, C / ||Δ||₂), with the norm taken over the whole adapter. This is the
per-update clipping of DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018) and the norm-bounding defence of Sun et al., "Can You Really Backdoor
Federated Learning?", arXiv:1911.07963, 2019.

A filter, not a rule: it maps updates to updates (new objects; inputs are not modified) and works one update at a
time, so it keeps a streaming rule streaming. The registry applies it when a strategy is built with ``clip_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from strategies.types import AggregationError, ClientUpdate

FILTER = "clip"


@dataclass(frozen=True)
class ClipConfig:
    """Parameters of the clipping filter.

    Attributes:
        max_norm: The bound C (> 0) on each update's global L2 norm.
    """

    max_norm: float

    def __post_init__(self) -> None:
        if not (self.max_norm > 0 and math.isfinite(self.max_norm)):
            raise AggregationError(f"{FILTER}: max_norm must be a finite number > 0, got {self.max_norm}")


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of a delta over all its tensors (float64)."""
    sq = sum(float(torch.sum(v.detach().to(torch.float64) ** 2)) for v in delta.values())
    return math.sqrt(sq)


def clip_update(update: ClientUpdate, config: ClipConfig) -> ClientUpdate:
    """Return the update with its delta scaled to norm <= ``max_norm``.

    An update already within the bound is returned as is. A clipped one is a new :class:`ClientUpdate` whose
    metadata gains ``"pre_clip_norm"``.

    Raises:
        AggregationError: If the delta's norm is not finite.
    """
    norm = delta_norm(update.delta)
    if not math.isfinite(norm):
        raise AggregationError(f"{FILTER}: update from site {update.site!r} has a non-finite norm")
    if norm <= config.max_norm:
        return update
    scale = config.max_norm / norm
    delta = {k: (v.detach().to(torch.float64) * scale).to(v.dtype) for k, v in update.delta.items()}
    metadata = {**update.metadata, "pre_clip_norm": norm}
    return ClientUpdate(site=update.site, delta=delta, num_examples=update.num_examples, metadata=metadata)


def clip_updates(updates: Iterable[ClientUpdate], config: ClipConfig) -> Iterator[ClientUpdate]:
    """Clip each update lazily, in order (keeps streaming rules streaming; holds no update between yields)."""
    it = iter(updates)
    while (u := next(it, None)) is not None:
        yield clip_update(u, config)
        del u
