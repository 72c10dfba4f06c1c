"""Compressed update encodings (blockwise absmax int8 / int4 / NF4, optional top-k), for both sides of the wire.

The byte layout is in docs/protocol.md ("Compressed updates") and the tensor names, shapes and dtypes in
:func:`protos.codec.encoded_layout`; this module turns a dense state into those tensors (:func:`encode`) and back
(:func:`decode`), checking every value a hostile payload could get wrong (absmax finite and >= 0, codes in range,
padding nibbles zero, top-k indices in range and strictly increasing). The site's error feedback
(:func:`residual`) is here too, so both sides decode exactly the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedcommon.tensors import check_against_spec, decode_state, dtype_name, torch_dtype
from protos import codec
from protos.codec import CodecError
from protos.fedbridge.v1 import federation_service_pb2 as pb

# The 16 NF4 levels (normal-float 4-bit: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0), as in QLoRA.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
INT4_LEVELS = 7  # int4 codes 1..15 stand for (code - 8) / 7 of the block's absmax; code 0 is never sent


def compression(encoding: str, block_size: int = 128, topk_fraction: float = 0.0) -> pb.Compression:
    """A checked :class:`Compression` message."""
    c = pb.Compression(encoding=encoding, block_size=block_size, topk_fraction=topk_fraction)
    codec.check_compression(c)
    return c


def _blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    """``v`` (1-D float32) zero-padded to whole blocks, shape ``(nb, block)``."""
    nb = -(-v.numel() // block)
    return torch.nn.functional.pad(v, (0, nb * block - v.numel())).view(nb, block)


def quantise(v: torch.Tensor, encoding: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (I8 per value, or U8 with two per byte, low nibble first) and per-block F32 absmax of 1-D ``v``."""
    m = v.numel()
    b = _blocks(v.detach().to(torch.float32).cpu(), block)
    absmax = b.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    x = (b / safe).clamp(-1.0, 1.0)
    if encoding == "int8":
        return torch.round(x * 127).to(torch.int8).reshape(-1)[:m].contiguous(), absmax
    if encoding == "int4":
        codes = (torch.round(x * INT4_LEVELS) + 8).to(torch.uint8)
    else:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        codes = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    codes = codes.reshape(-1)[:m]
    if m % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])  # the padding nibble is 0
    return (codes[0::2] | (codes[1::2] << 4)).contiguous(), absmax


def dequantise(q: torch.Tensor, absmax: torch.Tensor, encoding: str, block: int, m: int, where: str) -> torch.Tensor:
    """The ``m`` float32 values codes ``q`` and ``absmax`` stand for; :class:`CodecError` naming ``where`` on any
    value a well-formed encoder never produces."""
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise CodecError(f"tensor {where + '.absmax'!r} holds a negative or non-finite block scale")
    scale = absmax.to(torch.float32).repeat_interleave(block)[:m]
    if encoding == "int8":
        if bool((q == -128).any()):
            raise CodecError(f"tensor {where + '.q'!r} holds the int8 code -128 (codes are -127..127)")
        return q.to(torch.float32) / 127 * scale
    codes = torch.stack([q & 0x0F, q >> 4], dim=1).reshape(-1)
    if m % 2 and int(codes[m]) != 0:
        raise CodecError(f"tensor {where + '.q'!r}: the padding nibble after the last code must be 0")
    codes = codes[:m]
    if encoding == "int4":
        if bool((codes == 0).any()):
            raise CodecError(f"tensor {where + '.q'!r} holds the int4 code 0 (codes are 1..15)")
        return (codes.to(torch.float32) - 8) / INT4_LEVELS * scale
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)[codes.long()] * scale


def encode(state: Mapping[str, torch.Tensor], c: pb.Compression, *, topk: bool = True) -> dict[str, torch.Tensor]:
    """The encoded tensors of a dense state (names as :func:`protos.codec.encoded_layout`).

    Args:
        state: Dense tensors (any float dtype; quantised from their float32 values).
        c: The compression (checked).
        topk: False for the global-adapter download (the quantiser alone).
    """
    codec.check_compression(c)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        v = state[name].detach().to(torch.float32).cpu().reshape(-1)
        if topk and c.topk_fraction > 0:
            k = codec.topk_count(v.numel(), c.topk_fraction)
            idx = torch.sort(torch.topk(v.abs(), k, sorted=False).indices).values
            out[name + ".idx"] = idx.to(torch.int32).contiguous()
            v = v[idx]
        out[name + ".q"], out[name + ".absmax"] = quantise(v, c.encoding, c.block_size)
    return out


def decode(encoded: Mapping[str, torch.Tensor], spec: pb.AdapterSpec, *, topk: bool = True) -> dict[str, torch.Tensor]:
    """The dense state (the spec's names, shapes and dtypes) an encoded payload stands for.

    Raises:
        CodecError: The tensors are not exactly :func:`protos.codec.encoded_layout`'s, or a value is malformed.
    """
    header = {k: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for k, t in encoded.items()}
    codec.check_header_against_spec(header, spec, encoded=True, topk=topk)
    c = spec.compression
    out: dict[str, torch.Tensor] = {}
    for t in spec.tensors:
        n = math.prod(t.shape)
        use_topk = topk and c.topk_fraction > 0
        idx = encoded[t.name + ".idx"].to(torch.int64) if use_topk else None
        m = n if idx is None else idx.numel()
        values = dequantise(encoded[t.name + ".q"], encoded[t.name + ".absmax"], c.encoding, c.block_size, m, t.name)
        if idx is None:
            dense = values
        else:
            if m and (int(idx[0]) < 0 or int(idx[-1]) >= n):
                raise CodecError(f"tensor {t.name + '.idx'!r} holds an index outside 0..{n - 1}")
            if m > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise CodecError(f"tensor {t.name + '.idx'!r}: indices must be strictly increasing (so unique)")
            dense = torch.zeros(n, dtype=torch.float32)
            dense[idx] = values
        out[t.name] = dense.view(list(t.shape)).to(torch_dtype(t.dtype))
    return out


def residual(sent_from: Mapping[str, torch.Tensor], encoded: Mapping[str, torch.Tensor],
             spec: pb.AdapterSpec) -> dict[str, torch.Tensor]:
    """Error feedback: what compression left out of ``sent_from`` (the delta plus the previous residual), in
    float32, to add to the next round's delta. Sums over rounds telescope: what was sent plus the last residual
    equals what was meant to be sent."""
    dense = decode(encoded, spec)
    return {k: (sent_from[k].detach().to(torch.float32).cpu() - dense[k].to(torch.float32)).contiguous()
            for k in sent_from}


def decode_update(data: bytes, spec: pb.AdapterSpec, *, topk: bool = True) -> dict[str, torch.Tensor]:
    """The dense state of an update payload (or of a compressed download, ``topk=False``) that follows ``spec``:
    decoded when the spec names a compression, then checked like any update (exact keys, shapes, dtypes, finite).

    Raises:
        CodecError: Malformed bytes, an encoding that breaks the spec's layout, or a state off the spec.
    """
    state = decode_state(data)
    if spec.compression.encoding:
        state = decode(state, spec, topk=topk)
    check_against_spec(state, spec)
    return state
