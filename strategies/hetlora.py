"""HetLoRA: sites with different LoRA ranks, by zero-padding to the global rank and truncating back.

Cho, Liu, Ma, Fahrbach, Joshi and Duan, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024 (arXiv:2401.06432).

The global adapter has rank R per module. A site of rank r_i <= R (declared at Join, ``metadata["lora_rank"]``,
and visible in its shapes) trains the global's first r_i components (:func:`for_site`) and sends a delta of rank
r_i. Its delta is zero-padded to R and averaged with example weights:

* ``average_over="all"`` (the paper's zero-padding): every component is divided by the total weight, so
  components only high-rank sites hold move less.
* ``average_over="holders"``: each rank component is averaged over the sites that hold it.

We pad the DELTA, which means "a site leaves the components it does not hold unchanged"; padding the full factors
instead would drag those components towards zero every round. For equal ranks both modes equal FedAvg. The paper's
rank self-pruning and sparsity-weighted aggregation are not implemented. The rule is linear and streams. Products
are compared unscaled: sites should share one LoRA scaling (for example alpha proportional to r).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.lora import check_mixed_ranks, pairs_of, truncate_rank
from strategies.types import AggregationError, AggregationResult, ClientUpdate, StateDict, feed

RULE = "hetlora"
_MODES = ("all", "holders")


@dataclass(frozen=True)
class HetLoraConfig:
    """Parameters of HetLoRA.

    Attributes:
        average_over: ``"all"`` (zero-padding, the paper) or ``"holders"`` (per-component average over the sites
            that hold the component).
    """

    average_over: str = "all"

    def __post_init__(self) -> None:
        if self.average_over not in _MODES:
            raise AggregationError(f"{RULE}: average_over must be one of {list(_MODES)}, got {self.average_over!r}")


def for_site(global_state: Mapping[str, torch.Tensor], rank: int | Mapping[str, int]) -> StateDict:
    """The global adapter truncated to a site's rank (what that site receives with its task)."""
    return truncate_rank(global_state, rank)


class HetLoraAccumulator:
    """Streaming HetLoRA: zero-padded weighted sums plus per-component weight sums."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], config: HetLoraConfig = HetLoraConfig()) -> None:
        self._global = global_state
        self._config = config
        self._pairs = pairs_of(global_state)[0]
        self._sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_state.items()}
        self._held = {p.module: torch.zeros(global_state[p.a_key].shape[0], dtype=torch.float64) for p in self._pairs}
        self._lora_keys = {k for p in self._pairs for k in (p.a_key, p.b_key)}
        self.total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """How many updates were added."""
        return self._count

    def add(self, update: ClientUpdate) -> None:
        """Check ranks and fold one zero-padded update in."""
        check_mixed_ranks(self._global, [update])
        w = float(update.num_examples)
        for k, v in update.delta.items():
            if k not in self._lora_keys:
                self._sum[k].add_(v.detach(), alpha=w)
        for p in self._pairs:
            a, b = update.delta[p.a_key], update.delta[p.b_key]
            r = a.shape[0]
            self._sum[p.a_key][:r].add_(a.detach(), alpha=w)
            self._sum[p.b_key][:, :r].add_(b.detach(), alpha=w)
            self._held[p.module][:r] += w
        self.total_weight += w
        self._count += 1

    def result(self) -> AggregationResult:
        """global + padded mean delta, in the global dtype."""
        if self._count == 0:
            raise AggregationError(f"{RULE}: no updates to aggregate")
        mean = {k: s / self.total_weight for k, s in self._sum.items()}
        if self._config.average_over == "holders":
            for p in self._pairs:
                held = self._held[p.module]
                scale = torch.where(held > 0, self.total_weight / held.clamp_min(1e-300), torch.zeros_like(held))
                mean[p.a_key] = mean[p.a_key] * scale[:, None]
                mean[p.b_key] = mean[p.b_key] * scale[None, :]
        state = {k: (g.detach().to(torch.float64) + mean[k]).to(g.dtype) for k, g in self._global.items()}
        return AggregationResult(state=state, info={"num_updates": self._count})


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: HetLoraConfig = HetLoraConfig()) -> StateDict:
    """Aggregate one round of mixed-rank updates with HetLoRA.

    Args:
        global_state: The round's global adapter (FULL state, rank R per module).
        updates: The round's DIFF updates of rank r_i <= R (consumed once, one at a time).
        config: HetLoRA parameters.

    Returns:
        The new global adapter at rank R; inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes/ranks.
    """
    acc = HetLoraAccumulator(global_state, config)
    feed(acc, updates)
    return acc.result().state
