"""LoRA helpers shared by the LoRA-aware rules: key pairing, ranks, full site factors, rank padding/truncation.

Keys follow PEFT's saved-adapter names: ``<module>.lora_A.weight`` is A with shape ``[r, in]`` and
``<module>.lora_B.weight`` is B with shape ``[out, r]`` (an adapter name segment such as ``lora_A.default.weight``
is accepted too). The module's update to its frozen base weight is ``scaling · B @ A`` with ``scaling = alpha / r``;
everything here works with the UNSCALED product B @ A, and the caller applies the scaling.

The base weight a pair belongs to is named as in the plain (non-PEFT) model: ``base_model.model.`` is stripped and
``.weight`` appended, so ``base_model.model.model.layers.0.self_attn.q_proj`` maps to
``model.layers.0.self_attn.q_proj.weight``.

Mixed ranks: the global adapter has rank R per module; a site of rank r <= R holds the first r components (rows of
A, columns of B). Its delta has shape ``[r, in]`` / ``[out, r]`` and its full factors are the global's first r
components plus its delta.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.types import AggregationError, ClientUpdate, StateDict

_PAIR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    """The A and B keys of one LoRA-adapted module.

    Attributes:
        module: PEFT module path, for example ``base_model.model.model.layers.0.self_attn.q_proj``.
        a_key: Key of A (``[r, in]``).
        b_key: Key of B (``[out, r]``).
    """

    module: str
    a_key: str
    b_key: str

    @property
    def base_weight(self) -> str:
        """Name of the frozen base weight this pair adapts (residuals are keyed by it)."""
        m = self.module.removeprefix(_PEFT_PREFIX)
        return m + ".weight"


def split_keys(keys: Iterable[str]) -> tuple[list[LoraPair], list[str]]:
    """Pair the LoRA keys by module; other keys (biases, ``modules_to_save``) come back apart.

    Raises:
        AggregationError: On an A without its B (or the reverse), or on LoRA kinds whose product is not a plain
            ``B @ A`` (embedding LoRA).
    """
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    other: list[str] = []
    for k in keys:
        if ".lora_embedding_" in k:
            raise AggregationError(f"LoRA key {k!r}: embedding LoRA is not supported by the LoRA-exact rules")
        m = _PAIR_RE.match(k)
        if m is None:
            other.append(k)
            continue
        side = a_keys if m["which"] == "A" else b_keys
        if m["module"] in side:
            raise AggregationError(f"LoRA module {m['module']!r} has two lora_{m['which']} tensors")
        side[m["module"]] = k
    if a_keys.keys() != b_keys.keys():
        lone = sorted(a_keys.keys() ^ b_keys.keys())[:3]
        raise AggregationError(f"LoRA modules without both lora_A and lora_B: {lone}")
    pairs = [LoraPair(module=m, a_key=a_keys[m], b_key=b_keys[m]) for m in sorted(a_keys)]
    return pairs, other


def pairs_of(state: Mapping[str, torch.Tensor]) -> tuple[list[LoraPair], list[str]]:
    """:func:`split_keys` plus a check that every pair is a 2-D ``B [out, r] @ A [r, in]``.

    Raises:
        AggregationError: On unpaired keys or factors that do not multiply.
    """
    pairs, other = split_keys(state.keys())
    for p in pairs:
        a, b = state[p.a_key], state[p.b_key]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AggregationError(f"LoRA module {p.module!r}: expected B [out, r] and A [r, in], got B "
                                   f"{tuple(b.shape)} and A {tuple(a.shape)}")
    return pairs, other


def rank(state: Mapping[str, torch.Tensor], pair: LoraPair) -> int:
    """The rank of one pair in a state (rows of A)."""
    return int(state[pair.a_key].shape[0])


def normalized_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Example weights n_i / Σ n."""
    total = float(sum(u.num_examples for u in updates))
    return [u.num_examples / total for u in updates]


def check_mixed_ranks(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
                      ) -> tuple[list[LoraPair], list[str]]:
    """Check updates whose LoRA ranks may be lower than the global's.

    Every update must have the global's keys; non-LoRA tensors must match in shape; each pair's delta must be
    ``A [r_i, in]`` and ``B [out, r_i]`` with r_i <= the global rank. A ``metadata["lora_rank"]`` declared at Join
    must equal every pair's r_i.

    Returns:
        The global's pairs and other keys.

    Raises:
        AggregationError: On no updates or any mismatch.
    """
    if not updates:
        raise AggregationError("no updates to aggregate")
    pairs, other = pairs_of(global_state)
    for u in updates:
        if u.delta.keys() != global_state.keys():
            missing = sorted(global_state.keys() - u.delta.keys())[:3]
            extra = sorted(u.delta.keys() - global_state.keys())[:3]
            raise AggregationError(f"update from site {u.site!r}: keys differ from the global adapter "
                                   f"(missing {missing}, unexpected {extra})")
        for k in other:
            if tuple(u.delta[k].shape) != tuple(global_state[k].shape):
                raise AggregationError(f"update from site {u.site!r}: tensor {k!r} has shape "
                                       f"{tuple(u.delta[k].shape)}, expected {tuple(global_state[k].shape)}")
        declared = u.metadata.get("lora_rank")
        for p in pairs:
            ga, gb = global_state[p.a_key], global_state[p.b_key]
            a, b = u.delta[p.a_key], u.delta[p.b_key]
            r = int(a.shape[0]) if a.dim() == 2 else -1
            if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != ga.shape[1] or b.shape[0] != gb.shape[0]
                    or b.shape[1] != r or r < 1 or r > ga.shape[0]):
                raise AggregationError(f"update from site {u.site!r}: LoRA module {p.module!r} has B "
                                       f"{tuple(b.shape)} and A {tuple(a.shape)}; expected B [{gb.shape[0]}, r] "
                                       f"and A [r, {ga.shape[1]}] with 1 <= r <= {ga.shape[0]}")
            if declared is not None and int(declared) != r:
                raise AggregationError(f"update from site {u.site!r}: declared lora_rank {declared} but module "
                                       f"{p.module!r} has rank {r}")
    return pairs, other


def site_factors(global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], pair: LoraPair
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's FULL factors ``(B_i, A_i)`` in float64: the global's first r_i components plus the site's delta."""
    a, b = delta[pair.a_key], delta[pair.b_key]
    r = a.shape[0]
    full_a = global_state[pair.a_key][:r].to(torch.float64) + a.to(torch.float64)
    full_b = global_state[pair.b_key][:, :r].to(torch.float64) + b.to(torch.float64)
    return full_b, full_a


def truncate_rank(state: Mapping[str, torch.Tensor], rank: int | Mapping[str, int]) -> StateDict:
    """Keep the first ``rank`` components of every pair (HetLoRA truncation, FlexLoRA projection to a site).

    Args:
        state: A FULL adapter state.
        rank: One rank for every module, or a mapping module -> rank (missing modules keep their rank).

    Returns:
        A new state (clones; the input is not modified).

    Raises:
        AggregationError: If a requested rank is < 1 or above the state's rank.
    """
    pairs, other = pairs_of(state)
    out: StateDict = {k: state[k].detach().clone() for k in other}
    for p in pairs:
        have = int(state[p.a_key].shape[0])
        r = rank if isinstance(rank, int) else rank.get(p.module, have)
        if not 1 <= r <= have:
            raise AggregationError(f"LoRA module {p.module!r}: cannot truncate rank {have} to {r}")
        out[p.a_key] = state[p.a_key][:r].detach().clone()
        out[p.b_key] = state[p.b_key][:, :r].detach().clone()
    return {k: out[k] for k in state}


def product(state: Mapping[str, torch.Tensor], pair: LoraPair) -> torch.Tensor:
    """The unscaled float64 product ``B @ A`` of one pair."""
    return state[pair.b_key].to(torch.float64) @ state[pair.a_key].to(torch.float64)
