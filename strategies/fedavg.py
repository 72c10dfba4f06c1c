"""FedAvg: example-weighted average of the sites' updates.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data", AISTATS 2017.

Applied to LoRA deltas this averages A and B separately; the product of the means is not the mean of the products
(see the LoRA-exact rules). The rule is linear, so it also streams: :class:`FedAvgAccumulator` folds one update at a
time and keeps memory at O(adapter size) whatever the number of sites.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.types import AggregationError, ClientUpdate, StateDict, check_compatible, feed


@dataclass(frozen=True)
class FedAvgConfig:
    """Parameters of FedAvg.

    Attributes:
        server_lr: Step size applied to the averaged delta (1.0 is plain FedAvg).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise AggregationError(f"fedavg: server_lr must be > 0, got {self.server_lr}")


# Elements per block in :meth:`FedAvgAccumulator.add_many`: 256K float32 sums (1 MiB) stay in a 2 MiB L2 cache while
# every update's matching slice streams past them. Measured in ``bench/aggregate.py`` on distinct stored updates, one
# thread: 64K / 128K / 256K blocks read at 0.49 / 0.53 / 0.53 of memcpy's bandwidth at 8M parameters, N = 10, and
# 0.58 / 0.62 / 0.65 at 64M (longer runs per call let the hardware prefetcher run ahead; 512K spills out of L2).
BLOCK = 1 << 18


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: float32 for float32/16-bit adapters, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


class FedAvgAccumulator:
    """Streaming weighted sum of deltas.

    Sums are kept in the adapter's own float32 (float64 for a float64 adapter). Float64 sums of float32 updates would
    double the memory traffic and take torch's slow mixed-dtype kernels (measured 2.5x slower than float32 in
    ``bench/aggregate.py``), for a rounding error that float32 keeps below 1e-6 relative for hundreds of sites.
    Reproducibility does not rest on precision but on order: :meth:`add_many` sums the updates in site-name order,
    so the same updates give the same bits whatever order they arrived in; callers of :meth:`add` that need this
    feed updates in a fixed order (the coordinator does).

    Memory is one copy of the adapter whatever the number of updates; an update can be dropped as soon as
    :meth:`add` returns (the accumulator keeps no reference to it).
    """

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self._shapes = {k: tuple(v.shape) for k, v in template.items()}
        dtypes = {sum_dtype(v.dtype) for v in template.values()}
        # One flat buffer holds every sum, keys in name order (how safetensors lays out a one-dtype file), so updates
        # laid out the same way are summed over the whole buffer in blocks (add_many), without a Python step per key.
        self._layout = tuple((k, self._shapes[k]) for k in sorted(self._shapes))
        self._flat: torch.Tensor | None = None
        # The sums start uninitialised: the first update folded in writes ``w * delta`` over them (exactly what
        # ``0 + w * delta`` gives), which saves one pass of writes over the whole adapter (a fresh buffer's zero-fill
        # touches every page). ``count == 0`` marks them as not yet written.
        if len(dtypes) == 1:
            self._flat = torch.empty(sum(math.prod(s) for _, s in self._layout), dtype=dtypes.pop())
            self._sum: dict[str, torch.Tensor] = {}
            at = 0
            for k, shape in self._layout:
                n = math.prod(shape)
                self._sum[k] = self._flat[at:at + n].view(shape)
                at += n
            self._sum = {k: self._sum[k] for k in template}  # iterate in the template's order
        else:
            self._sum = {k: torch.empty(v.shape, dtype=sum_dtype(v.dtype)) for k, v in template.items()}
        self.total_weight = 0.0
        self.count = 0
        self._released = False
        self._fused: tuple[Mapping[str, torch.Tensor], float, StateDict] | None = None

    def add(self, update: ClientUpdate) -> None:
        """Fold one update in (checks keys and shapes against the template)."""
        if self._released:
            raise AggregationError("fedavg: accumulator already released by apply_to(release=True)")
        self._check(update)
        w = float(update.num_examples)
        for k, v in update.delta.items():
            # In place (promoting a 16-bit update on the fly): no temporary copy of the update is made.
            if self.count == 0:
                _scaled_into(self._sum[k], v.detach(), w)
            else:
                self._sum[k].add_(v.detach(), alpha=w)
        self.total_weight += w
        self.count += 1

    def add_many(self, updates: Sequence[ClientUpdate], *,
                 fuse_with: tuple[Mapping[str, torch.Tensor], float] | None = None) -> None:
        """Fold updates that are all in memory (or memory-mapped) already, block by block (all are checked first).

        The updates are summed in site-name order, so the result does not depend on the order of ``updates``. Each
        key is walked in blocks of :data:`BLOCK` elements and every update's matching slice is added to the block's
        sums while they sit in cache, instead of the whole accumulator streaming through memory once per update.
        Deltas may be lazy mappings (for example memory-mapped safetensors files): each tensor is read once.

        ``fuse_with=(global_state, lr)``: the caller will next call ``apply_to(global_state, lr, release=True)``
        and nothing else. On a fresh accumulator whose updates are flat views, the output is then computed here in
        the same pass (see :meth:`_fuse`; same bits) and ``apply_to`` hands it over.
        """
        if self._released or self._fused is not None:
            raise AggregationError("fedavg: accumulator already released by apply_to(release=True)")
        if fuse_with is not None:
            out = self._fuse(fuse_with[0], updates, fuse_with[1])
            if out is not None:
                self._fused = (fuse_with[0], fuse_with[1], out)
                return
        flats = [self._flat_of(u) for u in updates]
        if self._flat is not None and all(f is not None for f in flats):
            # Every update is one flat view laid out as the sums are (keys and shapes checked by the layout).
            pairs = sorted(zip(updates, flats, strict=True), key=lambda p: p[0].site)
            acc_flat = self._flat
            weights = [float(u.num_examples) for u, _ in pairs]
            flat_parts = [f for _, f in pairs if f is not None]
            _add_blocks(acc_flat, flat_parts, weights, fresh=self.count == 0)
            for w in weights:
                self.total_weight += w
            self.count += len(updates)
            return
        for u in updates:
            self._check(u)
        ordered = sorted(updates, key=lambda u: u.site)
        weights = [float(u.num_examples) for u in ordered]
        for k, acc in self._sum.items():
            flat = acc.view(-1)
            _add_blocks(flat, [u.delta[k].detach().reshape(-1) for u in ordered], weights, fresh=self.count == 0)
        for w in weights:
            self.total_weight += w
        self.count += len(updates)

    def _fuse(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], lr: float
              ) -> StateDict | None:
        """``global + lr * mean(updates)`` in one pass over memory, or None when the updates offer no flat view.

        What folding ``updates`` and then ``apply_to(global_state, lr)`` give, bit for bit (each element is summed
        in the same site-name order, then scaled by the same ``lr / total_weight`` and added to the global by the
        same elementwise op), but block by block: a block's sums stay in cache while every update's slice is added
        to them, and go straight into the output. Memory traffic is the N updates and the global read once and
        the output written once, the floor for FedAvg; the sums never exist in full. Fresh accumulator only.
        """
        if self.count or self._flat is None or not updates:
            return None
        flats = [self._flat_of(u) for u in updates]
        if any(f is None for f in flats) or global_state.keys() != self._shapes.keys():
            return None
        if any(tuple(g.shape) != self._shapes[k] for k, g in global_state.items()):
            return None  # not the template's global: the plain path reports the mismatch
        pairs = sorted(zip(updates, flats, strict=True), key=lambda p: p[0].site)
        parts = [f for _, f in pairs if f is not None]
        weights = [float(u.num_examples) for u, _ in pairs]
        for w in weights:
            self.total_weight += w
        self.count = len(updates)
        scale = lr / self.total_weight
        out = {k: torch.empty(self._shapes[k], dtype=g.dtype) for k, g in global_state.items()}
        # Each key's flat range in the layout (the updates' data order), with its output and global, flat.
        spans = []
        at = 0
        for k, shape in self._layout:
            n = math.prod(shape)
            spans.append((at, at + n, out[k].view(-1), global_state[k].detach().reshape(-1)))
            at += n
        scratch = torch.empty(BLOCK, dtype=self._flat.dtype)
        # Every update cut into its block views at once (in C: far cheaper than one slice per block and update).
        cuts = [p.split(BLOCK) for p in parts]
        first, rest = (cuts[0], weights[0]), list(zip(cuts[1:], weights[1:], strict=True))
        si = 0
        # Blocks run over the whole layout, across keys: small keys (a LoRA A of rank 8 is 32K elements) would
        # otherwise cost one Python step per key and update instead of per block and update.
        for bi, start in enumerate(range(0, at, BLOCK)):
            end = min(start + BLOCK, at)
            block = scratch[:end - start]
            _scaled_into(block, first[0][bi], first[1])
            for cut, w in rest:
                block.add_(cut[bi], alpha=w)
            while si < len(spans) and spans[si][0] < end:  # the keys this block covers, each its piece
                ks, ke, of, gf = spans[si]
                lo, hi = max(ks, start), min(ke, end)
                piece = block[lo - start:hi - start]
                if of.dtype == piece.dtype:
                    torch.add(gf[lo - ks:hi - ks], piece, alpha=scale, out=of[lo - ks:hi - ks])
                else:
                    of[lo - ks:hi - ks] = torch.add(gf[lo - ks:hi - ks], piece, alpha=scale)
                if ke > end:
                    break
                si += 1
        self._flat = None  # the sums were never written: nothing else can be read from this accumulator
        return out

    def _flat_of(self, update: ClientUpdate) -> torch.Tensor | None:
        """The update's deltas as one flat tensor laid out as the sums are, when its mapping offers one."""
        flat_view = getattr(update.delta, "flat_view", None)
        if self._flat is None or flat_view is None:
            return None
        view = flat_view()
        if view is None or view[1] != self._layout:
            return None
        return view[0]  # type: ignore[no-any-return]

    def _check(self, update: ClientUpdate) -> None:
        delta = update.delta
        if delta.keys() != self._shapes.keys() or any(tuple(v.shape) != self._shapes[k] for k, v in delta.items()):
            check_compatible(_shape_stub(self._shapes), [update])  # raises with a message naming the mismatch

    def mean(self) -> StateDict:
        """The weighted mean delta so far (in the sums' dtype)."""
        self._check_nonempty()
        return {k: v / self.total_weight for k, v in self._sum.items()}

    def lazy_mean(self) -> Mapping[str, torch.Tensor]:
        """The weighted mean delta as a read-only mapping that computes each tensor on access.

        Server steps iterate it key by key, so the whole mean never exists at once.
        """
        self._check_nonempty()
        return _LazyMean(self._sum, self.total_weight)

    def apply_to(self, global_state: Mapping[str, torch.Tensor], lr: float = 1.0, *, release: bool = False
                 ) -> StateDict:
        """Return ``global + lr * mean`` in each global tensor's dtype, one key at a time (memory-lean).

        Args:
            global_state: The round's global adapter (same keys as the template).
            lr: Server step size.
            release: Free each key's sum as soon as its output exists, so the peak is about the sums rather than
                sums plus output (sums kept in one flat buffer go all at once, at the end); the accumulator cannot
                be used afterwards.
        """
        if self._fused is not None:
            g0, lr0, fused = self._fused
            if g0 is not global_state or lr0 != lr or not release:
                raise AggregationError("fedavg: add_many(fuse_with=...) was given another global state or step size")
            self._fused, self._released = None, True
            return fused
        self._check_nonempty()
        scale = lr / self.total_weight
        out: StateDict = {}
        for k, g in global_state.items():
            # One temporary per key in the sums' dtype: g + sum·(lr/W), then cast back to the global's dtype.
            out[k] = torch.add(g.detach(), self._sum[k], alpha=scale).to(g.dtype)
            if release:
                del self._sum[k]
        if release:
            self._released = True
            self._flat = None
        return out

    def _check_nonempty(self) -> None:
        if self._released or self._fused is not None:
            raise AggregationError("fedavg: accumulator already released by apply_to(release=True)")
        if self.count == 0:
            raise AggregationError("fedavg: no updates accumulated")


class _LazyMean(Mapping[str, torch.Tensor]):
    def __init__(self, sums: Mapping[str, torch.Tensor], total: float) -> None:
        self._sums = sums
        self._total = total

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._sums[key] / self._total

    def __iter__(self) -> Iterator[str]:
        return iter(self._sums)

    def __len__(self) -> int:
        return len(self._sums)


def _shape_stub(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def apply_delta(global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lr: float = 1.0) -> StateDict:
    """Return ``global + lr * delta`` in each global tensor's dtype, without mutating either input."""
    out: StateDict = {}
    for k, g in global_state.items():
        # Key by key, so only one tensor's float64 temporaries exist at a time; torch.add promotes to float64.
        out[k] = torch.add(g.detach(), delta[k].to(torch.float64), alpha=lr).to(g.dtype)
    return out


def fold(acc: FedAvgAccumulator, updates: Iterable[ClientUpdate]) -> None:
    """Fold updates into ``acc``: key by key when they are a sequence in memory, else one at a time, lazily."""
    if isinstance(updates, Sequence):
        acc.add_many(updates)
    else:
        feed(acc, updates)


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedAvgConfig = FedAvgConfig()) -> StateDict:
    """New global state = global + server_lr * Σ n_i Δ_i / Σ n_i.

    Args:
        global_state: The round's global adapter (FULL state).
        updates: The accepted DIFF updates of the round. A sequence (already in memory) is folded key by key; any
            other iterable (for example a generator that loads one stored update at a time) is consumed once,
            lazily, so memory stays O(adapter size). Both give the same bits.
        config: FedAvg parameters.

    Returns:
        The new global adapter state; inputs are not modified.

    Raises:
        AggregationError: On no updates or mismatched keys/shapes.
    """
    acc = FedAvgAccumulator(global_state)
    if isinstance(updates, Sequence):
        acc.add_many(updates, fuse_with=(global_state, config.server_lr))
    else:
        feed(acc, updates)
    if acc.count == 0:
        raise AggregationError("fedavg: no updates to aggregate")
    return acc.apply_to(global_state, config.server_lr, release=True)


def _add_blocks(acc: torch.Tensor, parts: list[torch.Tensor], weights: list[float], *, fresh: bool = False) -> None:
    """``acc += sum(w * part)`` one block of ``BLOCK`` elements at a time (every part's block while it is in cache).

    ``fresh``: ``acc`` holds nothing yet (uninitialised memory); the first part is written over it as ``w * part``.
    """
    for start in range(0, acc.numel(), BLOCK):
        block = acc[start:start + BLOCK]
        for i, (part, w) in enumerate(zip(parts, weights, strict=True)):
            if fresh and i == 0:
                _scaled_into(block, part[start:start + BLOCK], w)
            else:
                block.add_(part[start:start + BLOCK], alpha=w)


def _scaled_into(out: torch.Tensor, part: torch.Tensor, w: float) -> None:
    """``out = w * part`` computed in ``out``'s dtype: the bits of ``0 + w * part`` added into zeros.

    ``torch.mul(part, w, out=out)`` would compute in ``part``'s dtype (a Python scalar does not promote), so a
    16-bit update would be rounded to 16 bits after the scaling; the copy widens it first, exactly.
    """
    if part.dtype == out.dtype:
        torch.mul(part, w, out=out)
    else:
        out.copy_(part)
        out.mul_(w)
