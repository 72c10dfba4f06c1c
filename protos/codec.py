"""The wire codec: adapter states as safetensors bytes, chunking, hashing, and signed update envelopes.

Tensors cross the trust boundary only as safetensors (never pickle). An update is a payload (safetensors bytes) plus
an :class:`UpdateEnvelope` naming round, site, base-model hash, payload SHA-256 and a fresh nonce, signed with the
site's Ed25519 key over the exact serialised envelope bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protos.fedbridge.v1 import federation_service_pb2 as pb

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: well below gRPC's 4 MiB default message limit.
NONCE_BYTES = 16

_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


class CodecError(ValueError):
    """A payload or envelope could not be encoded or decoded."""


class SignatureError(CodecError):
    """An envelope's signature does not verify against the site's key."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    try:
        return _ST_DTYPES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel on the wire") from None


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise an adapter state to safetensors bytes (tensors copied to contiguous CPU memory)."""
    if not state:
        raise CodecError("refusing to encode an empty state")
    tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CodecError(f"state entry {k!r} is a {type(v).__name__}, not a tensor")
        dtype_name(v.dtype)
        tensors[k] = v.detach().to("cpu").contiguous()
    return st_save(tensors)


def decode_state(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a state dict; raises :class:`CodecError` on anything malformed."""
    try:
        state = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CodecError(f"payload is not valid safetensors: {e}") from e
    if not state:
        raise CodecError("payload holds no tensors")
    return state


def iter_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, chunk)`` pairs covering ``data[offset:]``."""
    if chunk_size <= 0:
        raise CodecError(f"chunk_size must be > 0, got {chunk_size}")
    if not 0 <= offset <= len(data):
        raise CodecError(f"offset {offset} outside payload of {len(data)} bytes")
    view = memoryview(data)
    for start in range(offset, len(data), chunk_size):
        yield start, bytes(view[start:start + chunk_size])


def state_specs(state: Mapping[str, torch.Tensor]) -> list[pb.TensorSpec]:
    """Tensor specs (name, shape, dtype) of a state, sorted by name."""
    return [pb.TensorSpec(name=k, shape=list(state[k].shape), dtype=dtype_name(state[k].dtype)) for k in sorted(state)]


def adapter_spec_sha256(spec: pb.AdapterSpec) -> str:
    """Hash of an adapter spec's canonical JSON (its own ``sha256`` field excluded)."""
    canon = {
        "rank": spec.rank, "alpha": round(spec.alpha, 12), "dropout": round(spec.dropout, 12),
        "target_modules": sorted(spec.target_modules),
        "tensors": sorted([t.name, list(t.shape), t.dtype] for t in spec.tensors),
    }
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_adapter_spec(state: Mapping[str, torch.Tensor], rank: int, alpha: float, dropout: float,
                      target_modules: list[str]) -> pb.AdapterSpec:
    """Build an :class:`AdapterSpec` for ``state`` with its hash filled in."""
    spec = pb.AdapterSpec(rank=rank, alpha=alpha, dropout=dropout, target_modules=sorted(target_modules),
                          tensors=state_specs(state))
    spec.sha256 = adapter_spec_sha256(spec)
    return spec


def check_against_spec(state: Mapping[str, torch.Tensor], spec: pb.AdapterSpec) -> None:
    """Raise :class:`CodecError` unless ``state`` has exactly the spec's keys, shapes and dtypes, all finite."""
    want = {t.name: (tuple(t.shape), t.dtype) for t in spec.tensors}
    unknown = sorted(state.keys() - want.keys())
    missing = sorted(want.keys() - state.keys())
    if unknown:
        raise CodecError(f"payload has {len(unknown)} tensor(s) outside the adapter spec, e.g. {unknown[0]!r}")
    if missing:
        raise CodecError(f"payload lacks {len(missing)} tensor(s) of the adapter spec, e.g. {missing[0]!r}")
    for name, (shape, dtype) in want.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise CodecError(f"tensor {name!r} has shape {tuple(t.shape)}, the spec says {shape}")
        if dtype_name(t.dtype) != dtype:
            raise CodecError(f"tensor {name!r} has dtype {dtype_name(t.dtype)}, the spec says {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CodecError(f"tensor {name!r} holds NaN or Inf values")


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
    try:
        key.verify(bytes(signed.signature), bytes(signed.envelope))
    except InvalidSignature:
        raise SignatureError("update envelope signature does not verify with the site's key") from None
    env = pb.UpdateEnvelope()
    try:
        env.ParseFromString(bytes(signed.envelope))
    except DecodeError as e:
        raise SignatureError(f"signed bytes are not an UpdateEnvelope: {e}") from e
    if len(env.nonce) != NONCE_BYTES:
        raise SignatureError(f"envelope nonce must be {NONCE_BYTES} bytes, got {len(env.nonce)}")
    return env


def check_payload(envelope: pb.UpdateEnvelope, payload: bytes) -> None:
    """Raise :class:`CodecError` unless ``payload`` matches the envelope's size and SHA-256."""
    if len(payload) != envelope.payload_size:
        raise CodecError(f"payload is {len(payload)} bytes, the envelope says {envelope.payload_size}")
    got = sha256_hex(payload)
    if got != envelope.payload_sha256:
        raise CodecError(f"payload SHA-256 {got[:16]}… does not match the envelope's {envelope.payload_sha256[:16]}…")
