"""Types shared by every aggregation rule.

An adapter state is a plain ``dict[str, torch.Tensor]`` keyed by PEFT's saved-adapter names (for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Sites send DIFF states (local minus global);
rules return the new FULL global state and never mutate their inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(frozen=True)
class ServerState:
    """Server-side optimizer state carried from one round to the next (FedAvgM, FedAdam, FedYogi, FedAdagrad).

    Rules never keep state between calls: the caller stores this object with the round and passes it back to the
    next call, so a restarted coordinator resumes exactly (see ``to_flat``/``from_flat`` for safetensors).

    Attributes:
        rule: Name of the rule that produced the state; a rule refuses another rule's state.
        step: How many server steps produced this state (1 after the first round).
        tensors: Named slots (for example ``"m"`` and ``"v"``), each a state dict keyed like the adapter.
    """

    rule: str
    step: int
    tensors: Mapping[str, Mapping[str, torch.Tensor]]

    def __post_init__(self) -> None:
        if self.step < 0:
            raise AggregationError(f"server state of {self.rule!r}: step must be >= 0, got {self.step}")
        for slot in self.tensors:
            if "/" in slot:
                raise AggregationError(f"server state of {self.rule!r}: slot name {slot!r} must not contain '/'")

    def to_flat(self) -> StateDict:
        """Flatten to ``{"<slot>/<key>": tensor, "__step__": int64 scalar}`` for safetensors; rule is stored apart."""
        flat: StateDict = {f"{slot}/{k}": v for slot, sd in self.tensors.items() for k, v in sd.items()}
        flat["__step__"] = torch.tensor(self.step, dtype=torch.int64)
        return flat

    @classmethod
    def from_flat(cls, rule: str, flat: Mapping[str, torch.Tensor]) -> ServerState:
        """Inverse of :meth:`to_flat`.

        Raises:
            AggregationError: If ``__step__`` is missing or a key has no slot prefix.
        """
        if "__step__" not in flat:
            raise AggregationError(f"server state of {rule!r}: missing '__step__'")
        tensors: dict[str, StateDict] = {}
        for name, v in flat.items():
            if name == "__step__":
                continue
            slot, sep, key = name.partition("/")
            if not sep:
                raise AggregationError(f"server state of {rule!r}: key {name!r} has no '<slot>/' prefix")
            tensors.setdefault(slot, {})[key] = v
        return cls(rule=rule, step=int(flat["__step__"].item()), tensors=tensors)


Info = Mapping[str, float | int | str]


@dataclass(frozen=True)
class AggregationResult:
    """What every strategy returns through the registry (see :mod:`strategies.registry`).

    Attributes:
        state: The new FULL global adapter state (same keys as the round's global adapter; FLoRA may change ranks).
        server_state: Optimizer state to store with the round and pass to the next call; ``None`` for stateless
            rules.
        base_residual: Dense tensors keyed by BASE weight name (for example
            ``model.layers.0.self_attn.q_proj.weight``, shape ``[out, in]``) that the caller folds into the frozen
            base weights as ``W += (lora_alpha / r) * residual``. They are unscaled products of LoRA factors: the
            LoRA scaling is the caller's to apply. Empty for rules that fold nothing.
        info: Scalars about the aggregation worth logging (for example which sites Krum selected).
    """

    state: StateDict
    server_state: ServerState | None = None
    base_residual: StateDict = field(default_factory=dict)
    info: Info = field(default_factory=dict)


class _Adds(Protocol):
    def add(self, update: ClientUpdate) -> None: ...


def feed(accumulator: _Adds, updates: Iterable[ClientUpdate]) -> None:
    """Add every update to an accumulator, holding at most one at a time.

    A plain ``for u in updates`` keeps the previous update alive (in ``u``) while a lazy source loads the next one;
    dropping it first keeps a streaming rule's peak at one update plus the accumulator.
    """
    it = iter(updates)
    while (u := next(it, None)) is not None:
        accumulator.add(u)
        del u
