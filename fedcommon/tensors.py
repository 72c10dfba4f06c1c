"""Adapter states (torch tensors) as wire payloads and back, for both sides of the wire.

The payload format itself (header limits, adapter specs, envelopes) is :mod:`protos.codec`; this module adds the
torch side: encoding a state dict to safetensors bytes, decoding validated bytes, specs and norms of states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from protos.codec import CodecError, NonFiniteError, adapter_spec, check_header, check_header_against_spec
from protos.fedbridge.v1 import federation_service_pb2 as pb

_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}


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


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F32"`` -> ``torch.float32``)."""
    for dtype, st_name in _ST_DTYPES.items():
        if st_name == name:
            return dtype
    raise CodecError(f"dtype {name!r} cannot travel on the wire")


def decode_state(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a state dict; raises :class:`CodecError` on anything malformed."""
    data = bytes(data)
    check_header(data)
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError, OverflowError, TypeError) as e:
        raise CodecError(f"payload is not valid safetensors: {str(e)[:200]}") from e
    if not state:
        raise CodecError("payload holds no tensors")
    return state


def state_specs(state: Mapping[str, torch.Tensor]) -> list[pb.TensorSpec]:
    """Tensor specs (name, shape, dtype) of a state, sorted by name."""
    return [pb.TensorSpec(name=k, shape=list(state[k].shape), dtype=dtype_name(state[k].dtype)) for k in sorted(state)]


def make_adapter_spec(state: Mapping[str, torch.Tensor], rank: int, alpha: float, dropout: float,
                      target_modules: list[str], compression: pb.Compression | None = None) -> pb.AdapterSpec:
    """Build an :class:`AdapterSpec` for ``state`` with its hash filled in (``compression``: how updates encode it)."""
    return adapter_spec(state_specs(state), rank, alpha, dropout, target_modules, compression)


def check_against_spec(state: Mapping[str, torch.Tensor], spec: pb.AdapterSpec) -> None:
    """Raise :class:`CodecError` unless ``state`` has exactly the spec's keys, shapes and dtypes, all finite."""
    check_header_against_spec({k: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for k, t in state.items()}, spec)
    for name, t in state.items():
        if t.is_floating_point() and t.numel() and not _finite(t):
            raise NonFiniteError(f"tensor {name!r} holds NaN or Inf values")


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of a non-empty float tensor is finite: its min and max are (a NaN anywhere makes
    both NaN). One reducing pass: ``isfinite(t).all()`` writes a bool per element first, 10x slower, and it was
    the largest cost of the coordinator's check of each upload (``bench/load.py``)."""
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
