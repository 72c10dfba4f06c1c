"""Choice by config: strategy names and parameters to the uniform object the coordinator calls.

    strategy = build_strategy("fedadam", {"eta": 0.05, "clip_norm": 10.0})
    result = strategy.aggregate(global_state, updates, server_state)      # -> AggregationResult
    # next round: strategy.aggregate(result.state, next_updates, result.server_state)

``build_strategy`` refuses an unknown name or parameter, a parameter of the wrong type and an out-of-range value
with :class:`AggregationError` (a ``ValueError``) that names the strategy and the parameter, so a bad federation
config fails at start, not at the first round. Every strategy also accepts ``clip_norm`` (float > 0): the
norm-bound clipping filter (:mod:`strategies.clipping`) applied to each update before the rule.

Two kinds come back, both satisfying :class:`strategies.protocol.Strategy`:

* :class:`StreamingStrategy` (``streaming = True``): ``aggregate`` consumes ``updates`` lazily, one at a time, and
  ``accumulator(...)`` folds updates as they arrive; memory is O(adapter size) whatever the number of sites
  (FedEx-LoRA adds one dense matrix per adapted module).
* :class:`BatchStrategy` (``streaming = False``): the rule needs every update at once (median, trimmed mean, Krum,
  Multi-Krum, FLoRA, FlexLoRA).

``linear`` is True when the rule needs only the weighted sum of the updates (usable under secure aggregation);
``stateful`` is True when ``result.server_state`` must be stored with the round and passed back next round.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from strategies import (
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedex_lora,
    fedprox,
    fedsb,
    fedyogi,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    krum,
    median,
    multikrum,
    trimmed_mean,
)
from strategies.clipping import ClipConfig, clip_update
from strategies.fedavg import FedAvgAccumulator
from strategies.protocol import Accumulator, BulkAccumulator, MeanDeltaAccumulator
from strategies.types import AggregationError, AggregationResult, ClientUpdate, ServerState, StateDict, feed

DEFAULT_STRATEGY = "fedavg"
CLIP_PARAM = "clip_norm"
# Rules under which sites train at their own LoRA rank, and how each projects the global adapter to a site's rank.
SITE_RANK_RULES: dict[str, Callable[[Mapping[str, torch.Tensor], int], StateDict]] = {
    "hetlora": hetlora.for_site, "flexlora": flexlora.for_site}

SiteParams = Mapping[str, float | int | str | bool]
Begin = Callable[[Mapping[str, torch.Tensor], Any, ServerState | None], Accumulator]
Batch = Callable[[Mapping[str, torch.Tensor], list[ClientUpdate], Any], AggregationResult]


@dataclass(frozen=True)
class _Entry:
    config_cls: type
    linear: bool
    stateful: bool
    begin: Begin | None = None
    batch: Batch | None = None
    site_params: Callable[[Any], SiteParams] = lambda _c: {}


def _mean_info(acc: FedAvgAccumulator) -> dict[str, float | int | str]:
    return {"num_updates": acc.count, "total_weight": acc.total_weight}


def _plain(lr_of: Callable[[Any], float]) -> Begin:
    def begin(g: Mapping[str, torch.Tensor], config: Any, _state: ServerState | None) -> Accumulator:
        def finish(g2: Mapping[str, torch.Tensor], acc: FedAvgAccumulator) -> AggregationResult:
            info = _mean_info(acc)
            return AggregationResult(acc.apply_to(g2, lr_of(config), release=True), info=info)
        return MeanDeltaAccumulator(g, finish, fuse_lr=lr_of(config))
    return begin


def _server_opt(step: Callable[..., tuple[StateDict, ServerState]]) -> Begin:
    def begin(g: Mapping[str, torch.Tensor], config: Any, state: ServerState | None) -> Accumulator:
        def finish(g2: Mapping[str, torch.Tensor], acc: FedAvgAccumulator) -> AggregationResult:
            new, new_state = step(g2, acc.lazy_mean(), config, state)
            return AggregationResult(new, server_state=new_state, info=_mean_info(acc))
        return MeanDeltaAccumulator(g, finish)
    return begin


def _robust(fn: Callable[..., StateDict]) -> Batch:
    return lambda g, ups, config: AggregationResult(fn(g, ups, config), info={"num_updates": len(ups)})


def _krum(fn: Callable[..., tuple[StateDict, list[str]]]) -> Batch:
    def batch(g: Mapping[str, torch.Tensor], ups: list[ClientUpdate], config: Any) -> AggregationResult:
        state, sites = fn(g, ups, config)
        return AggregationResult(state, info={"num_updates": len(ups), "selected": ",".join(sites)})
    return batch


def _with_residual(fn: Callable[..., tuple[StateDict, StateDict]]) -> Batch:
    def batch(g: Mapping[str, torch.Tensor], ups: list[ClientUpdate], config: Any) -> AggregationResult:
        state, residual = fn(g, ups, config)
        return AggregationResult(state, base_residual=residual, info={"num_updates": len(ups)})
    return batch


_REGISTRY: dict[str, _Entry] = {
    "fedavg": _Entry(fedavg.FedAvgConfig, linear=True, stateful=False, begin=_plain(lambda c: c.server_lr)),
    "fedprox": _Entry(fedprox.FedProxConfig, linear=True, stateful=False, begin=_plain(lambda c: c.server_lr),
                      site_params=fedprox.site_params),
    "fedavgm": _Entry(fedavgm.FedAvgMConfig, linear=True, stateful=True, begin=_server_opt(fedavgm.step)),
    "fedadam": _Entry(fedadam.FedAdamConfig, linear=True, stateful=True, begin=_server_opt(fedadam.step)),
    "fedyogi": _Entry(fedyogi.FedYogiConfig, linear=True, stateful=True, begin=_server_opt(fedyogi.step)),
    "fedadagrad": _Entry(fedadagrad.FedAdagradConfig, linear=True, stateful=True,
                         begin=_server_opt(fedadagrad.step)),
    "median": _Entry(median.MedianConfig, linear=False, stateful=False, batch=_robust(median.aggregate)),
    "trimmed_mean": _Entry(trimmed_mean.TrimmedMeanConfig, linear=False, stateful=False,
                           batch=_robust(trimmed_mean.aggregate)),
    "krum": _Entry(krum.KrumConfig, linear=False, stateful=False, batch=_krum(krum.aggregate_with_selection)),
    "multikrum": _Entry(multikrum.MultiKrumConfig, linear=False, stateful=False,
                        batch=_krum(multikrum.aggregate_with_selection)),
    "ffa_lora": _Entry(ffa_lora.FFALoraConfig, linear=True, stateful=False,
                       begin=lambda g, c, _s: ffa_lora.accumulator(g, c), site_params=ffa_lora.site_params),
    "fed_sb": _Entry(fedsb.FedSBConfig, linear=True, stateful=False,
                     begin=lambda g, c, _s: fedsb.accumulator(g, c)),
    "fedex_lora": _Entry(fedex_lora.FedExLoraConfig, linear=False, stateful=False,
                         begin=lambda g, c, _s: fedex_lora.FedExLoraAccumulator(g, c)),
    "flora": _Entry(flora.FLoraConfig, linear=False, stateful=False, batch=_with_residual(flora.aggregate)),
    "hetlora": _Entry(hetlora.HetLoraConfig, linear=True, stateful=False,
                      begin=lambda g, c, _s: hetlora.HetLoraAccumulator(g, c)),
    "flexlora": _Entry(flexlora.FlexLoraConfig, linear=False, stateful=False,
                       batch=_with_residual(flexlora.aggregate)),
}
_ALIASES = {"fedmedian": "median", "fedtrimmedavg": "trimmed_mean"}


def list_strategies() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(_REGISTRY)


class _ClippingAccumulator:
    """Clips each update before handing it to the wrapped accumulator."""

    def __init__(self, inner: Accumulator, clip: ClipConfig) -> None:
        self._inner = inner
        self._clip = clip
        self.clipped = 0

    @property
    def count(self) -> int:
        return self._inner.count

    def add(self, update: ClientUpdate) -> None:
        clipped = clip_update(update, self._clip)
        self.clipped += clipped is not update
        self._inner.add(clipped)

    def add_many(self, updates: Sequence[ClientUpdate]) -> None:
        clipped = [clip_update(u, self._clip) for u in updates]
        self.clipped += sum(c is not u for c, u in zip(clipped, updates, strict=True))
        if isinstance(self._inner, BulkAccumulator):
            self._inner.add_many(clipped)
        else:
            feed(self._inner, clipped)

    def result(self) -> AggregationResult:
        r = self._inner.result()
        return dataclasses.replace(r, info={**r.info, "clipped": self.clipped})


def _check_state(name: str, stateful: bool, server_state: ServerState | None) -> None:
    if not stateful and server_state is not None:
        raise AggregationError(f"strategy {name!r} is stateless but was given a server state "
                               f"(from {server_state.rule!r})")


@dataclass(frozen=True)
class StreamingStrategy:
    """A rule that folds one update at a time (O(adapter) memory). See the module docstring.

    Attributes:
        name: Registered name.
        config: The rule's frozen config.
        linear: Needs only the weighted sum of the updates (secure-aggregation compatible).
        stateful: Returns a server state to pass back next round.
        site_params: Values the site trainer must apply, sent with the task.
        clip: The clipping filter applied before the rule, if any.
    """

    streaming: ClassVar[bool] = True
    name: str
    config: Any
    linear: bool
    stateful: bool
    site_params: SiteParams
    clip: ClipConfig | None
    _begin: Begin = field(repr=False)

    def accumulator(self, global_state: Mapping[str, torch.Tensor],
                    server_state: ServerState | None = None) -> Accumulator:
        """Start a round: ``add`` each accepted update as it arrives, then ``result()`` once.

        Raises:
            AggregationError: If a server state is given to a stateless rule.
        """
        _check_state(self.name, self.stateful, server_state)
        inner = self._begin(global_state, self.config, server_state)
        return inner if self.clip is None else _ClippingAccumulator(inner, self.clip)

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
                  server_state: ServerState | None = None) -> AggregationResult:
        """Aggregate one round.

        A generator (for example one that loads stored updates one at a time) is consumed lazily, so memory stays
        O(adapter); a sequence already in memory is folded key by key when the rule allows (faster, same bits).

        Raises:
            AggregationError: On no updates, mismatched updates, or a wrong server state.
        """
        acc = self.accumulator(global_state, server_state)
        if isinstance(updates, Sequence) and isinstance(acc, BulkAccumulator):
            acc.add_many(updates)  # already in memory: fold key by key (same bits, faster)
        else:
            feed(acc, updates)
        return acc.result()


@dataclass(frozen=True)
class BatchStrategy:
    """A rule that needs every update of the round at once. See the module docstring.

    Attributes:
        name: Registered name.
        config: The rule's frozen config.
        linear: Always False for the batch rules here.
        stateful: Always False for the batch rules here.
        site_params: Values the site trainer must apply, sent with the task.
        clip: The clipping filter applied before the rule, if any.
    """

    streaming: ClassVar[bool] = False
    name: str
    config: Any
    linear: bool
    stateful: bool
    site_params: SiteParams
    clip: ClipConfig | None
    _batch: Batch = field(repr=False)

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
                  server_state: ServerState | None = None) -> AggregationResult:
        """Aggregate one round (materialises ``updates``).

        Raises:
            AggregationError: On no updates, mismatched updates, rule-specific limits, or a server state.
        """
        _check_state(self.name, self.stateful, server_state)
        ups = list(updates)
        if self.clip is None:
            return self._batch(global_state, ups, self.config)
        clipped = [clip_update(u, self.clip) for u in ups]
        r = self._batch(global_state, clipped, self.config)
        n_clipped = sum(c is not u for c, u in zip(clipped, ups, strict=True))
        return dataclasses.replace(r, info={**r.info, "clipped": n_clipped})


def _coerce(name: str, key: str, value: object, want: object) -> object:
    """Check one parameter's type (TOML gives int, float, bool, str); ints are accepted for floats."""
    bad = AggregationError(f"strategy {name!r}: parameter {key!r} must be {getattr(want, '__name__', want)}, "
                           f"got {value!r} ({type(value).__name__})")
    if want is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if want is float:
        if not isinstance(value, int | float):
            raise bad
        return float(value)
    if want is int:
        if not isinstance(value, int):
            raise bad
        return value
    if want is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AggregationError(f"strategy {name!r}: parameter {key!r} has an unsupported type {want!r}")


def build_strategy(name: str = DEFAULT_STRATEGY, params: Mapping[str, object] | None = None
                   ) -> StreamingStrategy | BatchStrategy:
    """Build the strategy a federation config names.

    Args:
        name: A name from :func:`list_strategies` (case-insensitive, ``-`` or ``_``; Flower's ``fedmedian`` and
            ``fedtrimmedavg`` are accepted too). Defaults to ``"fedavg"``.
        params: The rule's config fields, plus the optional ``clip_norm``.

    Returns:
        A :class:`StreamingStrategy` or :class:`BatchStrategy`.

    Raises:
        AggregationError: On an unknown name, an unknown parameter, a parameter of the wrong type, or a value out
            of range; the message names the strategy and the parameter.
    """
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    entry = _REGISTRY.get(key)
    if entry is None:
        raise AggregationError(f"unknown strategy {name!r}; known strategies: {', '.join(list_strategies())}")
    hints = typing.get_type_hints(entry.config_cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(entry.config_cls)}
    kwargs: dict[str, object] = {}
    clip: ClipConfig | None = None
    for k, v in (params or {}).items():
        if k == CLIP_PARAM:
            clip = ClipConfig(max_norm=typing.cast(float, _coerce(key, k, v, float)))
        elif k in fields:
            kwargs[k] = _coerce(key, k, v, fields[k])
        else:
            known = ", ".join(sorted([*fields, CLIP_PARAM]))
            raise AggregationError(f"strategy {key!r}: unknown parameter {k!r}; known parameters: {known}")
    config = entry.config_cls(**kwargs)
    site_params = dict(entry.site_params(config))
    if entry.begin is not None:
        return StreamingStrategy(name=key, config=config, linear=entry.linear, stateful=entry.stateful,
                                 site_params=site_params, clip=clip, _begin=entry.begin)
    assert entry.batch is not None
    return BatchStrategy(name=key, config=config, linear=entry.linear, stateful=entry.stateful,
                         site_params=site_params, clip=clip, _batch=entry.batch)
