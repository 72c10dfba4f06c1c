"""FFA-LoRA: A frozen at a shared random initialisation, only B trained and averaged.

Sun, Li, Li and Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024 (arXiv:2403.12313).

Every site starts from the same A (the global adapter's A, drawn once from a shared seed) and never changes it, so
mean_i(B_i A) = mean_i(B_i) · A: averaging B alone is EXACT. The rule is linear in the updates, so it streams and is
compatible with secure aggregation and DP noise on B. The site trainer must freeze A (``site_params`` carries
``freeze_lora_A``); a site that sends a non-zero A delta is refused with :class:`AggregationError`, because
accepting it would silently make the average inexact. Non-LoRA tensors are averaged like FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator
from strategies.lora import LoraPair, pairs_of
from strategies.protocol import MeanDeltaAccumulator
from strategies.types import AggregationError, AggregationResult, ClientUpdate, StateDict, feed

RULE = "ffa_lora"


@dataclass(frozen=True)
class FFALoraConfig:
    """FFA-LoRA has no server-side parameters; A's seed is fixed when the global adapter is created."""


def site_params(config: FFALoraConfig) -> dict[str, bool]:
    """What the site trainer needs: ``{"freeze_lora_A": True}``."""
    return {"freeze_lora_A": True}


def check_frozen_a(update: ClientUpdate, pairs: Iterable[LoraPair]) -> None:
    """Refuse an update whose A delta is not exactly zero.

    Raises:
        AggregationError: Naming the site and the first offending module.
    """
    for p in pairs:
        a = update.delta.get(p.a_key)
        if a is not None and bool(torch.count_nonzero(a)):
            raise AggregationError(f"{RULE}: update from site {update.site!r} changes frozen lora_A of "
                                   f"{p.module!r} (max |ΔA| = {float(a.abs().max()):.3g}); FFA-LoRA sites must "
                                   f"freeze A")


def _lora_pairs(global_state: Mapping[str, torch.Tensor]) -> list[LoraPair]:
    pairs, _ = pairs_of(global_state)
    if not pairs:
        raise AggregationError(f"{RULE}: the global adapter has no lora_A/lora_B pairs")
    return pairs


def accumulator(global_state: Mapping[str, torch.Tensor], config: FFALoraConfig = FFALoraConfig()
                ) -> MeanDeltaAccumulator:
    """A streaming accumulator that refuses non-frozen A and ends with ``global + mean(Δ)``."""
    pairs = _lora_pairs(global_state)

    def finish(g: Mapping[str, torch.Tensor], acc: FedAvgAccumulator) -> AggregationResult:
        return AggregationResult(state=acc.apply_to(g, release=True), info={"num_updates": acc.count})

    return MeanDeltaAccumulator(global_state, finish, check=lambda u: check_frozen_a(u, pairs))


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FFALoraConfig = FFALoraConfig()) -> StateDict:
    """New global state: A unchanged, B (and non-LoRA tensors) the example-weighted mean.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (consumed once, one at a time).
        config: FFA-LoRA parameters (none).

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates, mismatched keys/shapes, no LoRA pairs, or a non-zero A delta.
    """
    acc = accumulator(global_state, config)
    feed(acc, updates)
    return acc.result().state
