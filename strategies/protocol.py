"""The uniform interface the coordinator calls, and the streaming building block of the linear rules.

Every rule in this package has a pure core function in its own module. The registry (:mod:`strategies.registry`)
wraps each one in an object that satisfies :class:`Strategy`, so the coordinator needs only this:

    strategy = build_strategy(name, params)              # refused at start on a bad name or parameter
    result = strategy.aggregate(global_state, updates, server_state)   # -> AggregationResult
    store(result.state, result.server_state, result.base_residual, result.info)

A rule is either *streaming* (``strategy.streaming is True``: it folds one update at a time, so memory is
O(adapter size) whatever the number of sites, and ``strategy.accumulator(...)`` exists) or *batch* (it needs all
updates at once: the robust rules, FLoRA and FlexLoRA). ``strategy.linear`` says whether the rule only needs the
weighted SUM of the updates, which is what secure aggregation can deliver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from strategies.fedavg import FedAvgAccumulator
from strategies.types import AggregationError, AggregationResult, ClientUpdate, ServerState


@runtime_checkable
class Accumulator(Protocol):
    """Incremental aggregation of one round: ``add`` each accepted update, then ``result`` once."""

    @property
    def count(self) -> int:
        """How many updates were added."""
        ...

    def add(self, update: ClientUpdate) -> None:
        """Fold one update in; the accumulator keeps no reference to it."""
        ...

    def result(self) -> AggregationResult:
        """The round's aggregate. Raises :class:`AggregationError` when no update was added."""
        ...


@runtime_checkable
class BulkAccumulator(Accumulator, Protocol):
    """An accumulator that can also fold a whole in-memory sequence at once (key by key, faster, same bits)."""

    def add_many(self, updates: Sequence[ClientUpdate]) -> None:
        """Fold every update of the sequence; all are checked before any is folded."""
        ...


class Strategy(Protocol):
    """What :func:`strategies.registry.build_strategy` returns."""

    @property
    def name(self) -> str:
        """The registered name."""
        ...

    @property
    def streaming(self) -> bool:
        """True when :meth:`aggregate` consumes ``updates`` lazily, one at a time (O(adapter) memory)."""
        ...

    @property
    def linear(self) -> bool:
        """True when the rule needs only the weighted sum of the updates (compatible with secure aggregation)."""
        ...

    @property
    def stateful(self) -> bool:
        """True when the rule returns a :class:`ServerState` that must be passed back next round."""
        ...

    @property
    def site_params(self) -> Mapping[str, float | int | str | bool]:
        """Values the site trainer must apply (for example FedProx's ``proximal_mu``); sent with the task."""
        ...

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
                  server_state: ServerState | None = None) -> AggregationResult:
        """Aggregate one round. Inputs are never modified."""
        ...


Finish = Callable[[Mapping[str, torch.Tensor], FedAvgAccumulator], AggregationResult]


class MeanDeltaAccumulator:
    """Streams the weighted mean delta (:class:`FedAvgAccumulator`) and ends with a rule's server step.

    Args:
        global_state: The round's global adapter; fixes keys and shapes.
        finish: Turns ``(global_state, accumulator)`` into the rule's result.
        check: Optional extra per-update check (for example FFA-LoRA's frozen-A check), run before folding.
        fuse_lr: Set when ``finish`` is exactly ``acc.apply_to(global_state, fuse_lr, release=True)`` (plain
            FedAvg-like rules): :meth:`add_many` then computes that output in the same pass over the updates.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], finish: Finish,
                 check: Callable[[ClientUpdate], None] | None = None, fuse_lr: float | None = None) -> None:
        self._global = global_state
        self._acc = FedAvgAccumulator(global_state)
        self._finish = finish
        self._check = check
        self._fuse_lr = fuse_lr

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._acc.count

    def add(self, update: ClientUpdate) -> None:
        """Check and fold one update in."""
        if self._check is not None:
            self._check(update)
        self._acc.add(update)

    def add_many(self, updates: Sequence[ClientUpdate]) -> None:
        """Check all, then fold all key by key (see :meth:`FedAvgAccumulator.add_many`)."""
        if self._check is not None:
            for u in updates:
                self._check(u)
        self._acc.add_many(updates, fuse_with=None if self._fuse_lr is None else (self._global, self._fuse_lr))

    def result(self) -> AggregationResult:
        """Run the server step on the mean delta."""
        if self._acc.count == 0:
            raise AggregationError("no updates to aggregate")
        return self._finish(self._global, self._acc)
