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


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of a state over all its tensors taken together (float64 accumulation).

    Every tensor counts, whatever its dtype: this is the norm a clip bounds, and :func:`clip_state` scales every
    tensor, so a tensor left out of the norm would escape the bound.
    """
    return math.sqrt(sum(float(torch.sum(v.detach().to(torch.float64) ** 2)) for v in state.values()))


def clip_state(state: Mapping[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the whole state by ``min(1, max_norm / ||state||₂)`` (one norm over all tensors, as in DP-FedAvg).

    Args:
        state: Tensors by name (not modified).
        max_norm: The bound C (> 0).

    Returns:
        ``(clipped, scale)``: a new dict (each tensor scaled in float64 and cast back to its dtype; a zero state is
        left as is) and the factor applied, 1.0 when the state was already within the bound.

    Raises:
        ValueError: The state's norm is not finite (NaN or Inf values), so no bound can be met by scaling.
    """
    norm = l2_norm(state)
    if not math.isfinite(norm):
        raise ValueError(f"the update has a non-finite L2 norm ({norm})")
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (v.detach().to(torch.float64) * scale).to(v.dtype) for k, v in state.items()}, scale


def clip_update(update: ClientUpdate, config: ClipConfig) -> ClientUpdate:
    """Return the update with its delta scaled to norm <= ``max_norm``.

    An update already within the bound is returned as is. A clipped one is a new :class:`ClientUpdate` whose
    metadata gains ``"pre_clip_norm"``.

    Raises:
        AggregationError: If the delta's norm is not finite.
    """
    norm = l2_norm(update.delta)
    if not math.isfinite(norm):
        raise AggregationError(f"{FILTER}: update from site {update.site!r} has a non-finite norm")
    if norm <= config.max_norm:
        return update
    delta, _ = clip_state(update.delta, config.max_norm)
    metadata = {**update.metadata, "pre_clip_norm": norm}
    return ClientUpdate(site=update.site, delta=delta, num_examples=update.num_examples, metadata=metadata)


def clip_updates(updates: Iterable[ClientUpdate], config: ClipConfig) -> Iterator[ClientUpdate]:
    """Clip each update lazily, in order (keeps streaming rules streaming; holds no update between yields)."""
    it = iter(updates)
    while (u := next(it, None)) is not None:
        yield clip_update(u, config)
        del u
