"""FLoRA: stack the sites' LoRA factors along the rank, then merge the stack into the base weights.

Wang, Shen, Fang, Liu, Bao, Zhang and Liu, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024 (arXiv:2409.05976).

With example weights w_i and the sites' FULL factors (global + delta; ranks may differ), per LoRA module:

    B_stack = [B_1 | B_2 | … | B_N]              ([out, Σ r_i], sites in name order)
    A_stack = [w_1 A_1; w_2 A_2; …; w_N A_N]     ([Σ r_i, in])
    B_stack A_stack = Σ w_i B_i A_i              (exact)

The stacked rank grows with N, so :func:`merge_stack` folds it into a dense base residual (keyed by base weight name,
UNSCALED: the caller folds ``W_base += (lora_alpha / r) · residual``) and resets the adapter to the round's A with
B = 0, which is where the paper restarts each round's LoRA. ``max_rank`` lets small stacks be published as an
adapter instead (then publish it with ``lora_alpha`` scaled so alpha / r stays the sites' value). The rule needs
every update at once (batch). Non-LoRA tensors are averaged like FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.lora import check_mixed_ranks, normalized_weights, pairs_of, product, site_factors
from strategies.types import AggregationError, ClientUpdate, StateDict

RULE = "flora"


@dataclass(frozen=True)
class FLoraConfig:
    """Parameters of FLoRA.

    Attributes:
        max_rank: Publish the stacked adapter while every module's stacked rank is <= ``max_rank``; otherwise
            merge it into the base. 0 (the default, the paper's behaviour) merges every round.
    """

    max_rank: int = 0

    def __post_init__(self) -> None:
        if self.max_rank < 0:
            raise AggregationError(f"{RULE}: max_rank must be >= 0, got {self.max_rank}")


def stack(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]) -> StateDict:
    """Stack the sites' full factors along the rank (see the module docstring).

    Args:
        global_state: The round's global adapter (FULL state, rank R per module).
        updates: The round's DIFF updates, of rank r_i <= R per module.

    Returns:
        An adapter state with the global's keys whose pairs have rank Σ r_i (global dtype); non-LoRA tensors are
        the example-weighted mean. Inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes/ranks.
    """
    # Stack in site-name order, so the stacked factors do not depend on the order updates arrived in.
    ups = sorted(updates, key=lambda u: u.site)
    pairs, other = check_mixed_ranks(global_state, ups)
    w = normalized_weights(ups)
    out: StateDict = {}
    for k in other:
        g = global_state[k]
        mean = sum(wi * u.delta[k].to(torch.float64) for wi, u in zip(w, ups, strict=True))
        out[k] = (g.detach().to(torch.float64) + mean).to(g.dtype)
    for p in pairs:
        factors = [site_factors(global_state, u.delta, p) for u in ups]
        out[p.b_key] = torch.cat([b for b, _ in factors], dim=1).to(global_state[p.b_key].dtype)
        out[p.a_key] = torch.cat([wi * a for wi, (_, a) in zip(w, factors, strict=True)], dim=0
                                 ).to(global_state[p.a_key].dtype)
    return {k: out[k] for k in global_state}


def merge_stack(stacked: Mapping[str, torch.Tensor], reset_to: Mapping[str, torch.Tensor]
                ) -> tuple[StateDict, StateDict]:
    """Fold a stacked adapter into dense base residuals and reset the adapter.

    Args:
        stacked: An adapter state (any ranks), for example from :func:`stack`.
        reset_to: Gives the fresh adapter's A (kept) and B's shape (zeroed); the round's global adapter.

    Returns:
        ``(adapter, base_residual)``: the adapter with A from ``reset_to`` and B = 0 (non-LoRA tensors from
        ``stacked``), and per base weight name the unscaled float32 product ``B_stack A_stack``.

    Raises:
        AggregationError: If the two states have different keys.
    """
    if stacked.keys() != reset_to.keys():
        raise AggregationError(f"{RULE}: stacked and reset adapters have different keys")
    pairs, other = pairs_of(stacked)
    adapter: StateDict = {k: stacked[k].detach().clone() for k in other}
    residual: StateDict = {}
    for p in pairs:
        residual[p.base_weight] = product(stacked, p).to(torch.float32)
        adapter[p.a_key] = reset_to[p.a_key].detach().clone()
        adapter[p.b_key] = torch.zeros_like(reset_to[p.b_key])
    return {k: adapter[k] for k in stacked}, residual


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FLoraConfig = FLoraConfig()) -> tuple[StateDict, StateDict]:
    """Aggregate one round with FLoRA.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The round's DIFF updates (all needed at once; ranks may differ).
        config: FLoRA parameters.

    Returns:
        ``(new_global_state, base_residual)``: the stacked adapter and ``{}`` while it fits ``max_rank``, otherwise
        the reset adapter and the dense residuals (see :func:`merge_stack`).

    Raises:
        AggregationError: On no updates or mismatched keys/shapes/ranks.
    """
    stacked = stack(global_state, updates)
    pairs, _ = pairs_of(stacked)
    if config.max_rank > 0 and all(stacked[p.a_key].shape[0] <= config.max_rank for p in pairs):
        return stacked, {}
    return merge_stack(stacked, global_state)
