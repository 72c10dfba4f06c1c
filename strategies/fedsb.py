"""Fed-SB: sites train only an r×r matrix R between a fixed B and A; averaging R is exact.

Singhal, Ponkshe, Vartak and Vepakomma, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning" (arXiv:2502.15436), built on LoRA-SB (arXiv:2411.19557).

Per adapted module the update to the base weight is ``scaling · B R A`` with B ``[out, r]`` and A ``[r, in]`` FIXED
and identical at every site and at the coordinator, and only R ``[r, r]`` trained. Then

    mean_i(B R_i A) = B · mean_i(R_i) · A

so the example-weighted mean of the R matrices is the EXACT aggregate, the rule is linear (streaming, secure
aggregation and DP compatible: clipping and noise act on R alone), and a round's payload is r² numbers per module,
whatever the number of sites.

B and A never travel. LoRA-SB derives them from a truncated SVD of the first-step full gradient; that needs the base
weights and data, which the coordinator never holds, so here they come from :func:`fixed_factors`: an orthonormal
pair drawn from a seed that is a hash of the module's name and shape, which every site and the coordinator compute
alike (float64 draw and QR on the CPU, then float32). R starts at zero, so round 1 starts from the base model as
LoRA's B = 0 does.

Adapter layout: the federation's adapter holds one ``<module>.lora_R.weight`` tensor ``[r, r]`` per adapted module
(``<module>`` the PEFT module path as in LoRA keys). :func:`expand` turns it into a stock PEFT LoRA state
(``lora_A = A``, ``lora_B = B R``, same rank and alpha, so the same scaling), which is what is evaluated, merged
and published.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from strategies.fedavg import FedAvgAccumulator
from strategies.protocol import MeanDeltaAccumulator
from strategies.types import AggregationError, AggregationResult, ClientUpdate, StateDict, feed

RULE = "fed_sb"
R_SUFFIX = ".lora_R.weight"
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
_SEED_TAG = b"fedbridge/fed-sb/v1"


@dataclass(frozen=True)
class FedSBConfig:
    """Fed-SB has no server-side parameters (B and A are fixed by :func:`fixed_factors`)."""


def is_fedsb_name(strategy: str) -> bool:
    """True when a federation's ``strategy`` names Fed-SB (``fed-sb``, ``fed_sb``, any case)."""
    return strategy.strip().lower().replace("-", "_") == RULE


def is_fedsb_state(keys: Iterable[str]) -> bool:
    """True when the adapter (its tensor names) is a Fed-SB adapter: every tensor is a ``lora_R`` matrix."""
    names = list(keys)
    return bool(names) and all(k.endswith(R_SUFFIX) for k in names)


def r_key(module: str) -> str:
    """The adapter key of module ``module``'s R matrix."""
    return module + R_SUFFIX


def module_of(key: str) -> str:
    """The PEFT module path of an R, A or B key (``…q_proj.lora_R.weight`` -> ``…q_proj``)."""
    for suffix in (R_SUFFIX, A_SUFFIX, B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise AggregationError(f"{RULE}: {key!r} is not a lora_R, lora_A or lora_B key")


def _seed(module: str, out_features: int, in_features: int, rank: int) -> int:
    text = f"{module}\0{out_features}\0{in_features}\0{rank}".encode()
    return int.from_bytes(hashlib.sha256(_SEED_TAG + b"\0" + text).digest()[:8], "little") & ((1 << 63) - 1)


def _orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A ``[rows, cols]`` float64 matrix with orthonormal columns (QR of a Gaussian draw, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def fixed_factors(module: str, out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``(B [out, r], A [r, in])`` of one module, the same wherever computed (float32).

    B has orthonormal columns and A orthonormal rows, so ``‖B R A‖_F = ‖R‖_F``: a clipping norm on R is the norm of
    the weight update it makes.

    Raises:
        AggregationError: If ``rank`` is < 1 or above ``min(out_features, in_features)``.
    """
    if not 1 <= rank <= min(out_features, in_features):
        raise AggregationError(f"{RULE}: module {module!r} ({out_features}x{in_features}) cannot take rank {rank} "
                               f"(1 <= r <= {min(out_features, in_features)})")
    gen = torch.Generator().manual_seed(_seed(module, out_features, in_features, rank))
    b = _orthonormal_columns(out_features, rank, gen)
    a = _orthonormal_columns(in_features, rank, gen).T
    return b.to(torch.float32).contiguous(), a.to(torch.float32).contiguous()


def zero_state(lora_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> StateDict:
    """The initial Fed-SB adapter (every R = 0) for a LoRA layout given as PEFT key -> shape.

    Raises:
        AggregationError: If the layout has keys other than LoRA A/B weights, or a module lacks one of them.
    """
    ranks: dict[str, int] = {}
    for key, shape in lora_shapes.items():
        if not (key.endswith(A_SUFFIX) or key.endswith(B_SUFFIX)):
            raise AggregationError(f"{RULE}: the adapter would hold {key!r}, which is not a LoRA A/B weight")
        ranks.setdefault(module_of(key), int(shape[0] if key.endswith(A_SUFFIX) else shape[1]))
    missing = sorted(m for m in ranks if m + A_SUFFIX not in lora_shapes or m + B_SUFFIX not in lora_shapes)
    if missing:
        raise AggregationError(f"{RULE}: LoRA modules without both lora_A and lora_B: {missing[:3]}")
    return {r_key(m): torch.zeros(r, r, dtype=dtype) for m, r in sorted(ranks.items())}


def expand(state: Mapping[str, torch.Tensor], module_shapes: Mapping[str, tuple[int, int]],
           dtype: torch.dtype | None = None) -> StateDict:
    """A Fed-SB adapter as a stock PEFT LoRA state: ``lora_A = A``, ``lora_B = B R`` (same rank and alpha).

    Args:
        state: ``<module>.lora_R.weight`` -> R ``[r, r]``.
        module_shapes: PEFT module path -> ``(out_features, in_features)`` of its base weight.
        dtype: dtype of the result; default R's.

    Returns:
        ``<module>.lora_A.weight`` and ``<module>.lora_B.weight`` for every module, sorted by key.

    Raises:
        AggregationError: On a key that is not an R matrix, a non-square R, or a module without a shape.
    """
    out: StateDict = {}
    for key in sorted(state):
        module, r = module_of(key), state[key]
        if not key.endswith(R_SUFFIX) or r.dim() != 2 or r.shape[0] != r.shape[1]:
            raise AggregationError(f"{RULE}: {key!r} with shape {tuple(r.shape)} is not an [r, r] lora_R matrix")
        if module not in module_shapes:
            raise AggregationError(f"{RULE}: module {module!r} of {key!r} is not an adapted module of the base")
        out_f, in_f = module_shapes[module]
        b, a = fixed_factors(module, out_f, in_f, int(r.shape[0]))
        want = dtype or r.dtype
        out[module + A_SUFFIX] = a.to(want)
        out[module + B_SUFFIX] = (b.to(torch.float64) @ r.to(torch.float64)).to(want).contiguous()
    return dict(sorted(out.items()))


def _check_update(global_state: Mapping[str, torch.Tensor], update: ClientUpdate) -> None:
    extra = sorted(k for k in update.delta if not k.endswith(R_SUFFIX))[:3]
    if extra:
        raise AggregationError(f"{RULE}: update from site {update.site!r} sends {extra}; Fed-SB sites send only "
                               f"the lora_R matrices (B and A are fixed)")


def accumulator(global_state: Mapping[str, torch.Tensor], config: FedSBConfig | None = None) -> MeanDeltaAccumulator:
    """A streaming accumulator: global R + the example-weighted mean of the R deltas.

    Raises:
        AggregationError: If the global adapter is not a Fed-SB adapter (only square ``lora_R`` matrices).
    """
    if not is_fedsb_state(global_state):
        odd = sorted(k for k in global_state if not k.endswith(R_SUFFIX))[:3]
        raise AggregationError(f"{RULE}: the global adapter is not a Fed-SB adapter (it holds {odd or 'nothing'}); "
                               f"start the federation with strategy 'fed-sb' so its adapter is made of lora_R matrices")
    for k, v in global_state.items():
        if v.dim() != 2 or v.shape[0] != v.shape[1]:
            raise AggregationError(f"{RULE}: global {k!r} has shape {tuple(v.shape)}, not [r, r]")

    def finish(g: Mapping[str, torch.Tensor], acc: FedAvgAccumulator) -> AggregationResult:
        return AggregationResult(state=acc.apply_to(g, release=True), info={"num_updates": acc.count})

    return MeanDeltaAccumulator(global_state, finish, check=lambda u: _check_update(global_state, u))


def aggregate(global_state: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate],
              config: FedSBConfig | None = None) -> StateDict:
    """New global Fed-SB adapter: each R is the global R plus the example-weighted mean of the sites' R deltas.

    Raises:
        AggregationError: On no updates, mismatched keys/shapes, or an adapter that is not Fed-SB.
    """
    acc = accumulator(global_state, config)
    feed(acc, updates)
    return acc.result().state
