"""The wire codec: the payload format (safetensors bytes, validated header first), chunking, hashing, adapter
specs, and signed update envelopes.

Tensors cross the trust boundary only as safetensors (never pickle). An update is a payload (safetensors bytes) plus
an :class:`UpdateEnvelope` naming round, site, base-model hash, payload SHA-256 and a fresh nonce, signed with the
site's Ed25519 key over the exact serialised envelope bytes.

This module works on bytes and protobuf messages only, so the protocol does not depend on torch; turning tensors
into payload bytes and back lives in :mod:`fedcommon.tensors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from protos.fedbridge.v1 import federation_service_pb2 as pb

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: well below gRPC's 4 MiB default message limit.
NONCE_BYTES = 16
MAX_ENVELOPE_BYTES = 4096  # an UpdateEnvelope holds ids and hashes only
# gRPC message limit both ends set (send and receive): room for a chunk plus its envelope, and for the largest
# unary replies (task, roster); both ends must agree, or the larger side's messages are refused by the other.
MAX_MESSAGE = 8 << 20
# Trailing metadata of a refusal that is worth retrying unchanged after the pause it gives, in milliseconds (the
# coordinator's disk is full: nothing was stored, nothing is wrong with the call). Absent: the status code alone says.
RETRY_AFTER_MS_KEY = "fedbridge-retry-after-ms"
# HTTP/2 flow control for a long fat link (50 Mbit/s x 150 ms RTT = 0.94 MB in flight): each end lets a stream's
# peer send this far ahead of what it has read (gRPC's default is 64 KiB, grown only as its BDP probe measures the
# path, which random loss keeps low) and keeps the BDP probe on, so the window is never what limits a transfer.
# Both ends set it (coordinator/server.py, site_agent/client.py); memory per stream is bounded by it.
HTTP2_WINDOW_BYTES = 4 << 20
HTTP2_OPTIONS = [("grpc.http2.lookahead_bytes", HTTP2_WINDOW_BYTES), ("grpc.http2.bdp_probe", 1)]


class CodecError(ValueError):
    """A payload or envelope could not be encoded or decoded."""


class SignatureError(CodecError):
    """An envelope's signature does not verify against the site's key."""


class PayloadMismatchError(CodecError):
    """The payload's size or SHA-256 differs from what its signed envelope declares."""


class NonFiniteError(CodecError):
    """A tensor holds NaN or Inf values."""


# Limits of what :func:`decode_state` parses at all (checked on the raw header before safetensors sees the bytes).
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 100_000
MAX_DIMS = 8
_DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CodecError(f"payload header names tensor {k[:64]!r} twice")
        out[k] = v
    return out


# Headers already validated, by their exact bytes and the data length that followed them (the whole input of the
# check): every site of a round sends the same spec, so N updates share one header, which is then parsed and checked
# once instead of N times (the coordinator maps every stored update again to aggregate it). Bounded in entries and in
# header size, so hostile headers only evict each other. Read-only: the entries are shared between callers.
_CHECKED: OrderedDict[tuple[bytes, int], dict[str, Any]] = OrderedDict()
_CHECKED_MAX = 16
_CHECKED_MAX_HEADER = 256 << 10
_CHECKED_LOCK = threading.Lock()


def check_header(data: bytes | mmap.mmap) -> dict[str, Any]:
    """Validate a safetensors header before parsing: sane length, known dtypes, shapes that match in-range,
    non-overlapping offsets.

    The safetensors library checks much of this too; doing it first bounds what hostile bytes can make it allocate
    or parse, and turns every malformation into a :class:`CodecError`.

    Returns:
        The header's tensor entries (name -> ``{"dtype", "shape", "data_offsets"}``, offsets relative to the data
        that follows the header, which starts at ``8 + header length``), in the header's order. Callers must not
        modify them: a header seen before (the same bytes before the same data length) returns the same entries.
    """
    if len(data) < 8:
        raise CodecError(f"payload of {len(data)} bytes is shorter than a safetensors header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        raise CodecError(f"payload header length {n} exceeds the payload or the {MAX_HEADER_BYTES}-byte limit")
    raw = bytes(data[8:8 + n])
    key = (raw, len(data) - 8 - n)
    with _CHECKED_LOCK:
        hit = _CHECKED.get(key)
        if hit is not None:
            _CHECKED.move_to_end(key)
            return dict(hit)
    entries = _check_header(raw, len(data) - 8 - n)
    if n <= _CHECKED_MAX_HEADER:
        with _CHECKED_LOCK:
            _CHECKED[key] = entries
            while len(_CHECKED) > _CHECKED_MAX:
                _CHECKED.popitem(last=False)
    return dict(entries)


def _check_header(raw: bytes, body: int) -> dict[str, Any]:
    """:func:`check_header` on the header's bytes ``raw`` followed by ``body`` bytes of data (never cached)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CodecError(f"payload header is not JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise CodecError("payload header is not a JSON object")
    tensors = [k for k in header if k != "__metadata__"]
    if len(tensors) > MAX_TENSORS:
        raise CodecError(f"payload names {len(tensors)} tensors, more than {MAX_TENSORS}")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CodecError("payload __metadata__ must map strings to strings")
    # Plain loops and exact type tests, not generator expressions: the coordinator checks every stored update's
    # header again each time it maps the file to aggregate it (hundreds of tensors per file, N files a round).
    spans = []
    for name in tensors:
        info = header[name]
        if type(info) is not dict or info.keys() != _ENTRY_KEYS:
            raise CodecError(f"payload header entry {name[:64]!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if type(dtype) is not str or dtype not in _DTYPE_SIZE:
            raise CodecError(f"tensor {name[:64]!r} has dtype {str(dtype)[:16]!r}, which cannot travel on the wire")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise CodecError(f"tensor {name[:64]!r} has a malformed shape")
        count = 1
        for d in shape:
            if type(d) is not int or not 0 <= d < 1 << 40:
                raise CodecError(f"tensor {name[:64]!r} has a malformed shape")
            count *= d
        if type(offsets) is not list or len(offsets) != 2:
            raise CodecError(f"tensor {name[:64]!r} has data offsets outside the payload's {body} data bytes")
        start, end = offsets
        if type(start) is not int or type(end) is not int or not 0 <= start <= end <= body:
            raise CodecError(f"tensor {name[:64]!r} has data offsets outside the payload's {body} data bytes")
        if count * _DTYPE_SIZE[dtype] != end - start:
            raise CodecError(f"tensor {name[:64]!r}: shape {shape} and dtype {dtype} do not match its byte range")
        spans.append((start, end, name))
    spans.sort()
    for (_, a_end, name_a), (b_start, _, name_b) in zip(spans, spans[1:], strict=False):
        if b_start < a_end:
            raise CodecError(f"tensors {name_a[:64]!r} and {name_b[:64]!r} overlap in the payload")
    return {name: header[name] for name in tensors}


def iter_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, chunk)`` pairs covering ``data[offset:]``."""
    if chunk_size <= 0:
        raise CodecError(f"chunk_size must be > 0, got {chunk_size}")
    if not 0 <= offset <= len(data):
        raise CodecError(f"offset {offset} outside payload of {len(data)} bytes")
    view = memoryview(data)
    for start in range(offset, len(data), chunk_size):
        yield start, bytes(view[start:start + chunk_size])


def adapter_spec_sha256(spec: pb.AdapterSpec) -> str:
    """Hash of an adapter spec's canonical JSON (its own ``sha256`` field excluded)."""
    canon = {
        "rank": spec.rank, "alpha": round(spec.alpha, 12), "dropout": round(spec.dropout, 12),
        "target_modules": sorted(spec.target_modules),
        "tensors": sorted([t.name, list(t.shape), t.dtype] for t in spec.tensors),
    }
    if spec.compression.encoding:  # only when set, so the hash of every dense spec is what it always was
        c = spec.compression
        canon["compression"] = {"encoding": c.encoding, "block_size": c.block_size,
                                "topk_fraction": round(c.topk_fraction, 12)}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def adapter_spec(tensors: list[pb.TensorSpec], rank: int, alpha: float, dropout: float,
                 target_modules: list[str], compression: pb.Compression | None = None) -> pb.AdapterSpec:
    """Build an :class:`AdapterSpec` over tensor specs (sorted by name) with its hash filled in."""
    ordered = sorted(tensors, key=lambda t: t.name)  # sorted here, not inline: the stub's Mapping overload confuses mypy
    spec = pb.AdapterSpec(rank=rank, alpha=alpha, dropout=dropout, target_modules=sorted(target_modules),
                          tensors=ordered)
    if compression is not None and compression.encoding:
        check_compression(compression)
        spec.compression.CopyFrom(compression)
    spec.sha256 = adapter_spec_sha256(spec)
    return spec


# Compressed update encodings (docs/protocol.md, "Compressed updates"): each spec tensor of n elements becomes
# ``<name>.absmax`` (F32, one per block of block_size values) and ``<name>.q`` (the codes), plus ``<name>.idx``
# (I32, the kept positions) under top-k.
ENCODINGS = ("int8", "int4", "nf4")
MAX_BLOCK_SIZE = 1 << 16


def check_compression(c: pb.Compression) -> None:
    """Raise :class:`CodecError` unless ``c`` names a known encoding, an even block size and a top-k fraction in
    [0, 1)."""
    if c.encoding not in ENCODINGS:
        raise CodecError(f"compression encoding {c.encoding[:16]!r} is not one of {', '.join(ENCODINGS)}")
    if not (2 <= c.block_size <= MAX_BLOCK_SIZE and c.block_size % 2 == 0):
        raise CodecError(f"compression block_size {c.block_size} must be even and in 2..{MAX_BLOCK_SIZE}")
    if not (math.isfinite(c.topk_fraction) and 0 <= c.topk_fraction < 1):
        raise CodecError(f"compression topk_fraction {c.topk_fraction} must be in [0, 1)")


def topk_count(n: int, fraction: float) -> int:
    """How many of a tensor's ``n`` elements top-k keeps: ``max(1, ceil(fraction * n))`` in IEEE doubles, at most n."""
    return min(n, max(1, math.ceil(fraction * n)))


def encoded_layout(spec: pb.AdapterSpec, *, topk: bool = True) -> dict[str, tuple[list[int], str]]:
    """The exact tensors (name -> (shape, dtype)) a payload of ``spec``'s compression holds.

    Args:
        spec: An adapter spec with ``compression.encoding`` set.
        topk: False for the global-adapter download, which uses the quantiser alone.
    """
    c = spec.compression
    check_compression(c)
    out: dict[str, tuple[list[int], str]] = {}
    for t in spec.tensors:
        n = math.prod(t.shape)
        if n >= 1 << 31:  # indices travel as I32
            raise CodecError(f"tensor {t.name!r} has {n} elements, too many to compress (at most 2**31 - 1)")
        m = n
        if topk and c.topk_fraction > 0:
            m = topk_count(n, c.topk_fraction)
            out[t.name + ".idx"] = ([m], "I32")
        out[t.name + ".absmax"] = ([-(-m // c.block_size)], "F32")
        out[t.name + ".q"] = ([m], "I8") if c.encoding == "int8" else ([-(-m // 2)], "U8")
    return out


def check_header_against_spec(header: Mapping[str, Any], spec: pb.AdapterSpec, *, encoded: bool = False,
                              topk: bool = True) -> None:
    """Raise :class:`CodecError` unless a checked header (:func:`check_header`) names exactly the spec's tensors,
    with the spec's shapes and dtypes (``encoded``: exactly those of :func:`encoded_layout`)."""
    want = encoded_layout(spec, topk=topk) if encoded else {t.name: (list(t.shape), t.dtype) for t in spec.tensors}
    unknown = sorted(header.keys() - want.keys())
    missing = sorted(want.keys() - header.keys())
    if unknown:
        raise CodecError(f"payload has {len(unknown)} tensor(s) outside the adapter spec, e.g. {unknown[0][:64]!r}")
    if missing:
        raise CodecError(f"payload lacks {len(missing)} tensor(s) of the adapter spec, e.g. {missing[0]!r}")
    for name, (shape, dtype) in want.items():
        info = header[name]
        if list(info["shape"]) != shape:
            raise CodecError(f"tensor {name!r} has shape {tuple(info['shape'])}, the spec says {tuple(shape)}")
        if info["dtype"] != dtype:
            raise CodecError(f"tensor {name!r} has dtype {info['dtype']}, the spec says {dtype}")


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def make_envelope(*, federation_id: str, round: int, site: str, base_model_sha256: str, payload: bytes,
                  adapter_spec_sha256: str, num_examples: int, kind: pb.PayloadKind = pb.PAYLOAD_KIND_DIFF,
                  epsilon_spent: float = 0.0) -> pb.UpdateEnvelope:
    """Describe ``payload`` in a fresh envelope (new nonce, current time)."""
    return pb.UpdateEnvelope(
        federation_id=federation_id, round=round, site=site, base_model_sha256=base_model_sha256,
        payload_sha256=sha256_hex(payload), payload_size=len(payload), nonce=new_nonce(), payload_kind=kind,
        adapter_spec_sha256=adapter_spec_sha256, num_examples=num_examples, epsilon_spent=epsilon_spent,
        created_unix_ms=int(time.time() * 1000))


def sign_envelope(envelope: pb.UpdateEnvelope, key: Ed25519PrivateKey) -> pb.SignedEnvelope:
    """Serialise and sign an envelope."""
    raw = envelope.SerializeToString(deterministic=True)
    return pb.SignedEnvelope(envelope=raw, signature=key.sign(raw))


def verify_envelope(signed: pb.SignedEnvelope, key: Ed25519PublicKey) -> pb.UpdateEnvelope:
    """Verify the signature and return the parsed envelope.

    Raises:
        SignatureError: The signature does not verify, or the signed bytes are not an envelope.
    """
    if len(signed.signature) != 64 or len(signed.envelope) > MAX_ENVELOPE_BYTES:
        raise SignatureError("update envelope signature or envelope has an invalid length")
    try:
        key.verify(bytes(signed.signature), bytes(signed.envelope))
    except InvalidSignature:
        raise SignatureError("update envelope signature does not verify with the site's key") from None
    env = pb.UpdateEnvelope()
    try:
        env.ParseFromString(bytes(signed.envelope))
    except (DecodeError, ValueError, RuntimeError) as e:
        raise SignatureError(f"signed bytes are not an UpdateEnvelope: {e}") from e
    if len(env.nonce) != NONCE_BYTES:
        raise SignatureError(f"envelope nonce must be {NONCE_BYTES} bytes, got {len(env.nonce)}")
    return env


def check_payload(envelope: pb.UpdateEnvelope, payload: bytes) -> None:
    """Raise :class:`CodecError` unless ``payload`` matches the envelope's size and SHA-256."""
    if len(payload) != envelope.payload_size:
        raise PayloadMismatchError(f"payload is {len(payload)} bytes, the envelope says {envelope.payload_size}")
    got = sha256_hex(payload)
    if got != envelope.payload_sha256:
        raise PayloadMismatchError(f"payload SHA-256 {got[:16]}… does not match the envelope's {envelope.payload_sha256[:16]}…")
