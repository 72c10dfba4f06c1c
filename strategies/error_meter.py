"""The aggregation-error meter: how far the published model is from the mean of the sites' LoRA updates.

Averaging LoRA factors separately publishes B̄ Ā, which is not mean_i(B_i A_i) (see Singhal et al., FedEx-LoRA,
ACL 2025, and Sun et al., FFA-LoRA, ICLR 2024). Per LoRA module this meter reports

    error = || mean_i(B_i A_i) − (B_pub A_pub + residual) ||_F / || mean_i(B_i A_i) ||_F

for what was ACTUALLY published: the published adapter's product plus any dense residual folded into the base
weight. The mean is example-weighted, over the sites' FULL factors (ranks may differ). Products are UNSCALED; with
one LoRA scaling across sites the ratio is the same scaled or not. A module whose target product is zero reports
0.0 when the published product is zero too, else ``inf``. Keys of the result are base weight names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from strategies.lora import LoraPair, check_mixed_ranks, normalized_weights, pairs_of, product, site_factors
from strategies.types import AggregationError, ClientUpdate


def _ratio(target: torch.Tensor, published: torch.Tensor) -> float:
    num = float(torch.linalg.matrix_norm(target - published))
    den = float(torch.linalg.matrix_norm(target))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# Modules whose dense product has at least this many elements are measured from their factors (see
# :func:`_module_error`): a Llama-8B MLP product is 4096 x 14336, and forming it for every module and site made the
# meter take minutes of a round's close on 2 cores; smaller ones keep the dense product.
FACTORED_MIN_ELEMENTS = 1 << 22


def _fro2(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||b @ a||_F^2`` without forming the product: ``sum((b^T b) * (a a^T))``, O((d + k) r^2) for rank r."""
    return float(((b.T @ b) * (a @ a.T)).sum())


def _module_error(b_cat: torch.Tensor, a_cat: torch.Tensor, published: Mapping[str, torch.Tensor], p: LoraPair,
                  residual: Mapping[str, torch.Tensor]) -> float:
    """One module's error: target ``b_cat @ a_cat`` against the published product (plus its dense residual).

    A large module without a residual is measured from the factors: the difference is the product of
    ``[b_cat, -B_pub]`` and ``[a_cat; A_pub]``, whose Frobenius norm needs only Gram matrices of the stacked ranks.
    Its rounding is about 1e-8 of the target's norm (the squares cancel), far below any error this meter reports.
    """
    d, k = b_cat.shape[0], a_cat.shape[1]
    if p.base_weight not in residual and d * k >= FACTORED_MIN_ELEMENTS:
        b_pub, a_pub = published[p.b_key].to(torch.float64), published[p.a_key].to(torch.float64)
        den2 = _fro2(b_cat, a_cat)
        num2 = max(0.0, _fro2(torch.cat([b_cat, -b_pub], dim=1), torch.cat([a_cat, a_pub], dim=0)))
        if den2 <= 0.0:
            return 0.0 if num2 == 0.0 else math.inf
        return math.sqrt(num2 / den2)
    pub = product(published, p)
    if p.base_weight in residual:
        pub = pub + residual[p.base_weight].to(torch.float64)
    return _ratio(b_cat @ a_cat, pub)


def aggregation_error(published: Mapping[str, torch.Tensor], site_adapters: Sequence[Mapping[str, torch.Tensor]],
                      weights: Sequence[float], base_residual: Mapping[str, torch.Tensor] | None = None
                      ) -> dict[str, float]:
    """Per-module relative error of the published model, given the sites' FULL adapters.

    Args:
        published: The adapter that was published.
        site_adapters: Each site's FULL adapter (global + delta); ranks may differ from the published one.
        weights: One non-negative weight per site (for example examples seen); normalised here.
        base_residual: Dense residuals folded into the base, keyed by base weight name (absent key = none).

    Returns:
        ``{base_weight_name: error}`` for every LoRA module of ``published``.

    Raises:
        AggregationError: On no sites, a weight count or key mismatch, or weights that do not sum to > 0.
    """
    if not site_adapters or len(site_adapters) != len(weights):
        raise AggregationError(f"error meter: need one weight per site adapter, got {len(site_adapters)} adapters "
                               f"and {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise AggregationError("error meter: weights must be >= 0 and sum to > 0")
    pairs, _ = pairs_of(published)
    for i, site in enumerate(site_adapters):
        if site.keys() != published.keys():
            raise AggregationError(f"error meter: site adapter #{i} has keys that differ from the published adapter")
        for p in pairs:
            a, b, pa, pb = site[p.a_key], site[p.b_key], published[p.a_key], published[p.b_key]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[1] != pa.shape[1] \
                    or b.shape[0] != pb.shape[0]:
                raise AggregationError(f"error meter: site adapter #{i} module {p.module!r} has B {tuple(b.shape)} "
                                       f"and A {tuple(a.shape)}, which do not match the published B "
                                       f"{tuple(pb.shape)} and A {tuple(pa.shape)}")
    residual = base_residual or {}
    out: dict[str, float] = {}
    for p in pairs:
        b_cat = torch.cat([(w / total) * site[p.b_key].to(torch.float64)
                           for w, site in zip(weights, site_adapters, strict=True)], dim=1)
        a_cat = torch.cat([site[p.a_key].to(torch.float64) for site in site_adapters], dim=0)
        out[p.base_weight] = _module_error(b_cat, a_cat, published, p, residual)
    return out


def aggregation_error_from_updates(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                                   published: Mapping[str, torch.Tensor],
                                   base_residual: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per-module relative error of the published model, given the round's global adapter and DIFF updates.

    Each site's FULL factors are the global's first r_i components plus its delta (as in :mod:`strategies.lora`),
    weighted by examples.

    Args:
        global_state: The round's global adapter (what the sites started from).
        updates: The round's DIFF updates (ranks may be lower than the global's).
        published: The adapter that was published.
        base_residual: Dense residuals folded into the base, keyed by base weight name.

    Returns:
        ``{base_weight_name: error}`` for every LoRA module.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes/ranks.
    """
    ups = list(updates)
    pairs, _ = check_mixed_ranks(global_state, ups)
    w = normalized_weights(ups)
    residual = base_residual or {}
    out: dict[str, float] = {}
    for p in pairs:
        factors = [site_factors(global_state, u.delta, p) for u in ups]
        b_cat = torch.cat([wi * b for wi, (b, _) in zip(w, factors, strict=True)], dim=1)
        a_cat = torch.cat([a for _, a in factors], dim=0)
        out[p.base_weight] = _module_error(b_cat, a_cat, published, p, residual)
    return out
