"""FlexLoRA: average the sites' dense LoRA products, then SVD back to each site's rank.

Bai, Chen, Qian, Yao and Li, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024 (arXiv:2402.11505).

Per LoRA module, with example weights w_i and the sites' FULL factors (ranks r_i <= R may differ):

    T = Σ w_i B_i A_i = U S Vᵀ,    B = U_R √S_R,    A = √S_R V_Rᵀ

so the new global adapter (rank R) holds T's best rank-R approximation with its components ordered by singular
value; truncating it to a site's rank r (:func:`for_site`) gives T's best rank-r approximation (Eckart–Young), which
is FlexLoRA's re-projection. The SVD is computed from the stacked factors (QR of [w_i B_i] and [A_i]ᵀ, then the SVD
of a small Σr × Σr core), so T is formed densely only when ``fold_residual`` asks for T − B A as a base residual
(UNSCALED, keyed by base weight name). We split √S over both factors; the paper's split differs only in where S
sits, not in B A. The rule needs every update at once (batch). Non-LoRA tensors are averaged like FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.lora import check_mixed_ranks, normalized_weights, site_factors, truncate_rank
from strategies.types import ClientUpdate, StateDict

RULE = "flexlora"


@dataclass(frozen=True)
class FlexLoraConfig:
    """Parameters of FlexLoRA.

    Attributes:
        fold_residual: Also return the truncation residual T − B A (dense, per base weight) to fold into the base,
            which makes the published model exact at the cost of one dense matrix per module.
    """

    fold_residual: bool = False


def for_site(global_state: Mapping[str, torch.Tensor], rank: int | Mapping[str, int]) -> StateDict:
    """The global adapter projected to a site's rank (its first components: the best rank-r approximation)."""
    return truncate_rank(global_state, rank)


def low_rank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``b @ a`` from the factors: ``(U, S, Vh)`` with ``b @ a = U diag(S) Vh``, signs fixed.

    Args:
        b: ``[out, k]`` float64.
        a: ``[k, in]`` float64.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    um, s, vhm = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    u, vh = qb @ um, vhm @ qa.T
    # Fix each component's sign (largest |entry| of U positive) so the factors do not depend on site order.
    sign = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1.0
    return u * sign[None, :], s, vh * sign[:, None]


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FlexLoraConfig = FlexLoraConfig()) -> tuple[StateDict, StateDict]:
    """Aggregate one round of mixed-rank updates with FlexLoRA.

    Args:
        global_state: The round's global adapter (FULL state, rank R per module).
        updates: The round's DIFF updates of rank r_i <= R (all needed at once).
        config: FlexLoRA parameters.

    Returns:
        ``(new_global_state, base_residual)``: the rank-R SVD factors of mean(B_i A_i) (global dtype), and the
        unscaled float32 residuals when ``fold_residual`` (else ``{}``). Inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes/ranks.
    """
    ups = list(updates)
    pairs, other = check_mixed_ranks(global_state, ups)
    w = normalized_weights(ups)
    out: StateDict = {}
    residual: StateDict = {}
    for k in other:
        g = global_state[k]
        mean = sum(wi * u.delta[k].to(torch.float64) for wi, u in zip(w, ups, strict=True))
        out[k] = (g.detach().to(torch.float64) + mean).to(g.dtype)
    for p in pairs:
        ga, gb = global_state[p.a_key], global_state[p.b_key]
        rank = ga.shape[0]
        factors = [site_factors(global_state, u.delta, p) for u in ups]
        b_cat = torch.cat([wi * b for wi, (b, _) in zip(w, factors, strict=True)], dim=1)
        a_cat = torch.cat([a for _, a in factors], dim=0)
        u_, s, vh = low_rank_svd(b_cat, a_cat)
        r = min(rank, s.shape[0])
        root = s[:r].sqrt()
        new_b = torch.zeros(gb.shape, dtype=torch.float64)
        new_a = torch.zeros(ga.shape, dtype=torch.float64)
        new_b[:, :r] = u_[:, :r] * root[None, :]
        new_a[:r] = root[:, None] * vh[:r]
        out[p.b_key] = new_b.to(gb.dtype)
        out[p.a_key] = new_a.to(ga.dtype)
        if config.fold_residual:
            published = out[p.b_key].to(torch.float64) @ out[p.a_key].to(torch.float64)
            residual[p.base_weight] = (b_cat @ a_cat - published).to(torch.float32)
    return {k: out[k] for k in global_state}, residual
