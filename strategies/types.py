"""Types shared by every aggregation rule.

An adapter state is a plain ``dict[str, torch.Tensor]`` keyed by PEFT's saved-adapter names (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Sites send DIFF states (local minus global);
rules return the new FULL global state and never mutate their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]


class AggregationError(ValueError):
    """Raised when updates cannot be aggregated (mismatched keys or shapes, no weight, bad config)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One site's contribution to a round.

    Attributes:
        site: The site's name (from its certificate).
        delta: Local adapter state minus the round's global adapter state (a DIFF payload).
        num_examples: How many training examples produced the delta; the FedAvg weight.
        metadata: Free-form scalars the rule may use (for example declared LoRA rank).
    """

    site: str
    delta: Mapping[str, torch.Tensor]
    num_examples: int
    metadata: Mapping[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples <= 0:
            raise AggregationError(f"update from site {self.site!r}: num_examples must be > 0, got {self.num_examples}")


def check_compatible(global_state: Mapping[str, torch.Tensor], updates: list[ClientUpdate] | tuple[ClientUpdate, ...]) -> None:
    """Raise :class:`AggregationError` unless every update has exactly the global keys and shapes."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    want = {k: tuple(v.shape) for k, v in global_state.items()}
    for u in updates:
        got = {k: tuple(v.shape) for k, v in u.delta.items()}
        if got.keys() != want.keys():
            missing = sorted(want.keys() - got.keys())[:3]
            extra = sorted(got.keys() - want.keys())[:3]
            raise AggregationError(f"update from site {u.site!r}: keys differ from the global adapter "
                                   f"(missing {missing}, unexpected {extra})")
        for k, shape in want.items():
            if got[k] != shape:
                raise AggregationError(f"update from site {u.site!r}: tensor {k!r} has shape {got[k]}, expected {shape}")
