"""Egress filters: named, composable privacy steps applied to the update delta just before it is encoded and signed.

Every filter maps a delta (``dict[str, Tensor]``, the adapter state minus the round's global adapter) to a new delta
and never modifies its input, so filters compose as a list and are independent of the training mode that produced
the delta (SFT, QLoRA, DPO, KTO, ORPO, SimPO all hand the same kind of delta to egress). The DP pipeline is
:class:`ClipFilter` followed by :class:`GaussianNoiseFilter` with the same bound (:func:`dp_filters`); the order is
checked by :func:`check_order`, because noise before clipping would be scaled down by the clip and void the
guarantee.

What the DP pipeline protects: clipping the *whole* site update of a round to L2 norm ``C`` and adding
``N(0, (σ·C)² I)`` is the Gaussian mechanism on the site's contribution to the round. That is **site-level**
("user-level") differential privacy as in DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018): the released update hides whether the site's whole dataset took part
in the round, not merely one example, and no per-example guarantee is claimed beyond that (it is implied, not
tightened). The accountant that turns σ and the number of rounds into ε is in :mod:`site_agent.egress.dp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedcommon.dp import csprng_generator
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.clipping import clip_state

Delta = dict[str, torch.Tensor]


class EgressFilter(Protocol):
    """One privacy step at site egress: a pure map from delta to delta (inputs are not modified)."""

    @property
    def name(self) -> str: ...

    def apply(self, delta: Mapping[str, torch.Tensor]) -> Delta: ...


@dataclass(frozen=True)
class ClipFilter:
    """Scale the whole delta by ``min(1, max_norm / ||Δ||₂)`` (one norm over all tensors, as in DP-FedAvg).

    The pre-clip norm is not reported: it is a function of the private data and is not covered by the noise.

    Attributes:
        max_norm: The bound C (> 0).
    """

    max_norm: float
    name: str = field(default="clip", init=False)

    def __post_init__(self) -> None:
        if not (self.max_norm > 0 and math.isfinite(self.max_norm)):
            raise ValueError(f"clip filter: max_norm must be a finite number > 0, got {self.max_norm}")

    def apply(self, delta: Mapping[str, torch.Tensor]) -> Delta:
        try:
            clipped, _ = clip_state(delta, self.max_norm)
        except ValueError:
            raise ValueError("clip filter: the update has a non-finite norm; nothing is sent") from None
        return clipped


@dataclass(frozen=True)
class GaussianNoiseFilter:
    """Add ``N(0, (noise_multiplier · max_norm)²)`` to every element of the delta.

    Only meaningful after a :class:`ClipFilter` with the same ``max_norm`` (the sensitivity); use :func:`dp_filters`.

    Attributes:
        noise_multiplier: σ, the noise standard deviation in units of the clip bound (> 0).
        max_norm: The clip bound C the delta was clipped to.
        generator: Source of the noise; :func:`fedcommon.dp.csprng_generator` unless a test needs a fixed seed.
    """

    noise_multiplier: float
    max_norm: float
    generator: torch.Generator = field(default_factory=csprng_generator, compare=False, repr=False)
    name: str = field(default="gaussian_noise", init=False)

    def __post_init__(self) -> None:
        for attr in ("noise_multiplier", "max_norm"):
            value = getattr(self, attr)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"gaussian noise filter: {attr} must be a finite number > 0, got {value}")

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.max_norm

    def apply(self, delta: Mapping[str, torch.Tensor]) -> Delta:
        out: Delta = {}
        for k in sorted(delta):  # a fixed order, so a seeded generator gives the same noise per key
            v = delta[k]
            noise = torch.normal(0.0, self.std, size=tuple(v.shape), generator=self.generator, dtype=torch.float64)
            out[k] = (v.detach().to(torch.float64).cpu() + noise).to(device=v.device, dtype=v.dtype)
        return {k: out[k] for k in delta}


WIRE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class CastFilter:
    """Cast every tensor of the delta to the wire dtype the adapter spec names (last in the chain).

    Clipping and noise run on the float32 delta; the cast comes after them, so the bound is applied to the values
    computed in full precision and the rounding to bfloat16 happens once. Rounding is post-processing: it changes
    no DP guarantee, and it moves each element by at most 2^-8 of its magnitude, so a clipped norm grows by at
    most that relative amount.

    Attributes:
        wire_dtype: The safetensors dtype name of the spec's tensors: ``F32`` or ``BF16``.
    """

    wire_dtype: str
    name: str = field(default="cast", init=False)

    def __post_init__(self) -> None:
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"cast filter: wire dtype {self.wire_dtype!r} is not one of {sorted(WIRE_DTYPES)}")

    @classmethod
    def for_spec(cls, spec_dtypes: Sequence[str]) -> CastFilter:
        """The cast to the one dtype all of a spec's tensors have (``[t.dtype for t in spec.tensors]``).

        Raises:
            ValueError: The spec mixes dtypes, or names none.
        """
        found = sorted(set(spec_dtypes))
        if len(found) != 1:
            raise ValueError(f"cast filter: the adapter spec must name one wire dtype, it names {found}")
        return cls(found[0])

    def apply(self, delta: Mapping[str, torch.Tensor]) -> Delta:
        dtype = WIRE_DTYPES[self.wire_dtype]
        return {k: v.detach().to(dtype).contiguous() for k, v in delta.items()}


@dataclass(frozen=True)
class CompressFilter:
    """Encode the delta with the adapter spec's compression (last in the chain, instead of :class:`CastFilter`).

    The output is the encoded tensors themselves (``<name>.q``, ``<name>.absmax``, ``<name>.idx``: see
    :mod:`fedcommon.compress`), which go on the wire as they are. ``feedback`` is the error-feedback residual of the
    site's previous round, added before encoding; :meth:`residual` is what this round's encoding leaves out.

    Compression comes after clipping and noise (the order is checked): it is post-processing of the noised delta,
    and so is the residual, which is computed from noised values only, so the DP accounting is unchanged.

    Attributes:
        spec: The round's adapter spec (``spec.compression`` set).
        feedback: The previous round's residual (float32, the spec's tensor names), or None.
    """

    spec: pb.AdapterSpec
    feedback: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    name: str = field(default="compress", init=False)

    def __post_init__(self) -> None:
        if not self.spec.compression.encoding:
            raise ValueError("compress filter: the adapter spec names no compression")

    def with_feedback(self, delta: Mapping[str, torch.Tensor]) -> Delta:
        """The values this round encodes: the delta plus the previous round's residual (float32)."""
        out: Delta = {}
        for k, v in delta.items():
            x = v.detach().to(torch.float32).cpu()
            if self.feedback is not None and k in self.feedback:
                x = x + self.feedback[k].to(torch.float32).cpu()
            out[k] = x
        return out

    def apply(self, delta: Mapping[str, torch.Tensor]) -> Delta:
        from fedcommon import compress

        return compress.encode(self.with_feedback(delta), self.spec.compression)

    def residual(self, delta: Mapping[str, torch.Tensor], encoded: Mapping[str, torch.Tensor]) -> Delta:
        """Error feedback for the next round: ``delta + feedback - decode(encoded)``."""
        from fedcommon import compress

        return compress.residual(self.with_feedback(delta), encoded, self.spec)


def check_order(filters: Sequence[EgressFilter]) -> None:
    """Refuse a pipeline whose noise is not preceded by a clip to the same bound, or whose cast or compression is
    not last (compression after the noise: the DP accounting holds for what is encoded).

    Raises:
        ValueError: Naming the misplaced filter.
    """
    bound: float | None = None
    for i, f in enumerate(filters):
        if isinstance(f, ClipFilter):
            bound = f.max_norm if bound is None else min(bound, f.max_norm)
        elif isinstance(f, GaussianNoiseFilter) and (bound is None or bound > f.max_norm):
            raise ValueError(f"egress filter {i} ({f.name}) adds noise calibrated to norm {f.max_norm} but no earlier "
                             "clip filter bounds the update to it (the order must be clip -> noise)")
        elif isinstance(f, (CastFilter, CompressFilter)) and i != len(filters) - 1:
            raise ValueError(f"egress filter {i} ({f.name}) must be the last one: a filter after it would compute in "
                             "the wire dtype or on encoded values, and noise after compression would not be what "
                             "the DP accounting assumes")


def apply_filters(delta: Mapping[str, torch.Tensor], filters: Sequence[EgressFilter]) -> Delta:
    """Run ``filters`` in order (after :func:`check_order`); an empty list returns a shallow copy of ``delta``."""
    check_order(filters)
    out = dict(delta)
    for f in filters:
        out = f.apply(out)
    return out


def dp_filters(noise_multiplier: float, clip_norm: float, generator: torch.Generator | None = None) -> list[EgressFilter]:
    """The DP egress pipeline: clip to ``clip_norm``, then Gaussian noise of std ``noise_multiplier · clip_norm``.

    ``noise_multiplier == 0`` gives the clip alone (bounded influence, no DP).
    """
    filters: list[EgressFilter] = [ClipFilter(clip_norm)]
    if noise_multiplier > 0:
        filters.append(GaussianNoiseFilter(noise_multiplier, clip_norm, generator or csprng_generator()))
    return filters
