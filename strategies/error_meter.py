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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from strategies.lora import LoraPair, check_mixed_ranks, normalized_weights, pairs_of
from strategies.types import AggregationError, ClientUpdate

# Below this relative error the Gram-matrix form has lost too many digits to cancellation (its rounding is about
# 1e-8 of the target's norm) and the module is measured again from QR factors (see :func:`_batch_errors`).
_GRAM_FLOOR = 1e-4


# Modules of one shape (and ranks) are measured together, stacked into batched matrix products: a per-module loop
# spent most of a round's close on per-operation overhead (a tiny Llama's 56 modules took 30-60 ms on 2 cores; a
# 7B's 224 modules pay the same overhead four times over). A batch holds at most this many float64 elements of its
# largest intermediate, so the meter's memory stays bounded whatever the model (256 MiB).
BATCH_ELEMENTS = 1 << 25


class _Factors:
    """A batch's stacked factors in float64, B transposed: ``bt`` is M x R' x d and ``a`` is M x R' x k.

    Rows ``[0, R)`` hold the weighted sites' factors one after the other, so ``bt[:, :R]^T @ a[:, :R]`` is each
    module's target ``mean_i(B_i A_i)``; rows ``[R, R')`` hold the published factors with A negated, so the whole
    ``bt^T @ a`` is target minus published. Every block is written in place (rows are contiguous), never
    concatenated.
    """

    def __init__(self, batch: Sequence[LoraPair], published: Mapping[str, torch.Tensor], site_ranks: Sequence[int]):
        b0, a0 = published[batch[0].b_key], published[batch[0].a_key]
        self.target_rows = sum(site_ranks)
        rows = self.target_rows + b0.shape[1]
        self.bt = torch.empty(len(batch), rows, b0.shape[0], dtype=torch.float64)
        self.a = torch.empty(len(batch), rows, a0.shape[1], dtype=torch.float64)
        self.offsets = [sum(site_ranks[:i]) for i in range(len(site_ranks))]
        self.fill(self.target_rows, batch, published)
        self.a[:, self.target_rows:].neg_()

    def fill(self, row: int, batch: Sequence[LoraPair], state: Mapping[str, torch.Tensor]) -> tuple[slice, int]:
        """Copy ``state``'s factors of every module of ``batch`` into the rows from ``row``; returns their slice."""
        r = state[batch[0].a_key].shape[0]
        rows = slice(row, row + r)
        # One stacked copy per factor, not one per module: the copies' per-operation cost was most of the meter's.
        self.bt[:, rows].copy_(torch.stack([state[p.b_key] for p in batch]).transpose(1, 2))
        self.a[:, rows].copy_(torch.stack([state[p.a_key] for p in batch]))
        return rows, r


def _gram_sums(bt: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``||bt_m^T @ a_m||_F^2`` per batch entry without forming the products: ``sum((B^T B) * (A A^T))``."""
    return (bt @ bt.transpose(1, 2)).mul_(a @ a.transpose(1, 2)).sum(dim=(1, 2))


def _batch_errors(f: _Factors, residual: torch.Tensor | None) -> list[float]:
    """Errors of a batch of modules of one shape: each target against its published product (plus its residual).

    A module without a residual is measured from its factors, never forming a d x k product: the difference is
    ``U V`` with ``U = bt^T`` and ``V = a`` (see :class:`_Factors`), and ``||U V||^2 = sum((U^T U) * (V V^T))``
    needs only Gram matrices of the stacked ranks. Those squares cancel when the error is tiny (an exact rule's zero
    would come out near 1e-8), so a module whose error is below :data:`_GRAM_FLOOR` is measured again from QR
    factors, ``U = Q_u R_u`` and ``V^T = Q_v R_v``: the norm is that of the small ``R_u R_v^T``, backward stable,
    at float64 rounding like the dense product. A module with a dense residual is measured dense.
    """
    t = f.target_rows
    if residual is None:
        gb, ga = f.bt @ f.bt.transpose(1, 2), f.a @ f.a.transpose(1, 2)
        den = (gb[:, :t, :t] * ga[:, :t, :t]).sum(dim=(1, 2))
        num = gb.mul_(ga).sum(dim=(1, 2))
        if bool((tiny := num <= _GRAM_FLOOR**2 * den).any()):
            r_u = torch.linalg.qr(f.bt[tiny].transpose(1, 2), mode="r").R
            r_v = torch.linalg.qr(f.a[tiny].transpose(1, 2), mode="r").R
            num[tiny] = (r_u @ r_v.transpose(1, 2)).square_().sum(dim=(1, 2))
        num2, den2 = num.clamp_min_(0.0).tolist(), den.tolist()
    else:
        diff = f.bt.transpose(1, 2) @ f.a - residual
        num2 = diff.square_().sum(dim=(1, 2)).tolist()
        den2 = _gram_sums(f.bt[:, :t], f.a[:, :t]).tolist()
    out = []
    for n, dn in zip(num2, den2, strict=True):
        out.append((0.0 if n == 0.0 else math.inf) if dn <= 0.0 else math.sqrt(n / dn))
    return out


def _batches(pairs: Sequence[LoraPair], published: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor],
             ranks: Callable[[LoraPair], tuple[int, ...]]
             ) -> Iterator[tuple[list[LoraPair], tuple[int, ...], torch.Tensor | None]]:
    """The modules in batches of one published shape, one set of site ranks and residual or not, each batch's
    float64 buffers within :data:`BATCH_ELEMENTS`; with the batch's site ranks and stacked residuals."""
    groups: dict[tuple[Any, ...], list[LoraPair]] = {}
    for p in pairs:
        key = (tuple(published[p.b_key].shape), tuple(published[p.a_key].shape), ranks(p), p.base_weight in residual)
        groups.setdefault(key, []).append(p)
    for (b_shape, a_shape, site_ranks, has_residual), group in groups.items():
        d, k, rows = b_shape[0], a_shape[1], sum(site_ranks) + b_shape[1]
        step = max(1, BATCH_ELEMENTS // ((d + k) * rows + (3 * d * k if has_residual else 0)))
        for i in range(0, len(group), step):
            batch = group[i:i + step]
            yield batch, site_ranks, (torch.stack([residual[p.base_weight] for p in batch]).to(torch.float64)
                                      if has_residual else None)


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
    for batch, ranks, res in _batches(pairs, published, residual,
                                      lambda p: tuple(site[p.a_key].shape[0] for site in site_adapters)):
        f = _Factors(batch, published, ranks)
        for w, site, row in zip(weights, site_adapters, f.offsets, strict=True):
            rows, _ = f.fill(row, batch, site)
            f.bt[:, rows] *= w / total
        out.update(zip((p.base_weight for p in batch), _batch_errors(f, res), strict=True))
    return {p.base_weight: out[p.base_weight] for p in pairs}


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
    for batch, ranks, res in _batches(pairs, published, residual,
                                      lambda p: tuple(u.delta[p.a_key].shape[0] for u in ups)):
        f = _Factors(batch, published, ranks)
        g_bt = torch.stack([global_state[p.b_key].T for p in batch]).to(torch.float64)
        g_a = torch.stack([global_state[p.a_key] for p in batch]).to(torch.float64)
        for wi, u, row in zip(w, ups, f.offsets, strict=True):  # FULL factors: the global's first r_i plus the delta
            rows, r = f.fill(row, batch, u.delta)
            f.bt[:, rows] += g_bt[:, :r]
            f.bt[:, rows] *= wi
            f.a[:, rows] += g_a[:, :r]
        out.update(zip((p.base_weight for p in batch), _batch_errors(f, res), strict=True))
    return {p.base_weight: out[p.base_weight] for p in pairs}
