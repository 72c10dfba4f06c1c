"""Stored safetensors files as lazy, memory-mapped state dicts (zero copy).

The coordinator keeps every accepted update as a safetensors file. To aggregate N of them key by key without holding
N decoded copies on the heap, :func:`map_state` maps a file and hands out each tensor as a read-only view of the
mapping: reading a tensor reads the page cache, nothing is copied, and memory stays file-backed (the kernel can drop
it under pressure). The header is validated as strictly as :func:`protos.codec.decode_state` would (dtypes, shapes,
offsets inside the file, no overlaps), so a bad file fails with :class:`protos.codec.CodecError` before any tensor
is touched.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from protos.codec import CodecError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_DTYPES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _DTYPES.items()}


class MappedState(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping of tensors that are views of one private memory map.

    Tensors are created on access and share the mapping (writes would go to private copy-on-write pages, never to
    the file). The map lives as long as this object or any tensor taken from it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise CodecError(f"{self.path}: {size} bytes is too short for a safetensors file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", self._map[:8])
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CodecError(f"{self.path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(self._map[8:8 + n])
        except ValueError as e:
            raise CodecError(f"{self.path}: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise CodecError(f"{self.path}: header is not a JSON object")
        self._entries = _check_header(self.path, header, base=8 + n, data_size=size - 8 - n)
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._views.get(key)
        if t is None:  # made once per key: a view costs no memory, and rules read each key more than once
            dtype, shape, offset, count = self._entries[key]
            t = (torch.empty(shape, dtype=dtype) if count == 0
                 else torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(shape))
            self._views[key] = t
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape, from the header alone."""
        return {k: e[1] for k, e in self._entries.items()}


def _check_header(path: Path, header: dict[str, object], base: int, data_size: int
                  ) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise CodecError(f"{where}: header entry is not an object")
        dtype = _DTYPES.get(str(info.get("dtype")))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise CodecError(f"{where}: unsupported dtype {info.get('dtype')!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CodecError(f"{where}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CodecError(f"{where}: data_offsets {offsets!r} fall outside the {data_size} data bytes")
        count = math.prod(shape)
        if offsets[1] - offsets[0] != count * _ITEMSIZE[str(info["dtype"])]:
            raise CodecError(f"{where}: {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {info['dtype']}")
        entries[key] = (dtype, tuple(shape), base + offsets[0], count)
        spans.append((offsets[0], offsets[1], key))
    if not entries:
        raise CodecError(f"{path}: the file holds no tensors")
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CodecError(f"{path}: tensors {a!r} and {b!r} overlap")
    return entries


def map_state(path: str | Path) -> MappedState:
    """Map the safetensors file at ``path`` (see :class:`MappedState`)."""
    return MappedState(path)
