"""Stored safetensors files as lazy, memory-mapped state dicts (zero copy).

The coordinator keeps every accepted update as a safetensors file. To aggregate N of them key by key without holding
N decoded copies on the heap, :func:`map_state` maps a file and hands out each tensor as a read-only view of the
mapping: reading a tensor reads the page cache, nothing is copied, and memory stays file-backed (the kernel can drop
it under pressure). The header is validated by :func:`protos.codec.check_header`, as a payload on the wire is, so a
bad file fails with :class:`protos.codec.CodecError` before any tensor is touched.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedcommon import tensors
from protos import codec
from protos.codec import CodecError


class MappedState(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping of tensors that are views of one private memory map.

    Tensors are created on access and share the mapping (writes would go to private copy-on-write pages, never to
    the file). The map lives as long as this object or any tensor taken from it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.seek(0, 2) < 8:
                raise CodecError(f"{self.path}: too short for a safetensors file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            header = codec.check_header(self._map)
        except CodecError as e:
            raise CodecError(f"{self.path}: {e}") from None
        if not header:
            raise CodecError(f"{self.path}: the file holds no tensors")
        base = 8 + int.from_bytes(self._map[:8], "little")
        self._entries = {k: (tensors.torch_dtype(v["dtype"]), tuple(v["shape"]), base + v["data_offsets"][0],
                             math.prod(v["shape"])) for k, v in header.items()}
        self._views: dict[str, torch.Tensor] = {}
        self._flat: tuple[torch.Tensor, tuple[tuple[str, tuple[int, ...]], ...]] | None | bool = False  # not yet made

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

    def flat_view(self) -> tuple[torch.Tensor, tuple[tuple[str, tuple[int, ...]], ...]] | None:
        """All tensors as ONE flat zero-copy view and its layout ((key, shape), ... in data order), or None.

        Only when every tensor has the same dtype and they lie back to back from the start of the data, as the
        safetensors writer lays them out (sorted by name within a dtype). A streaming sum can then walk the file in
        large blocks instead of tensor by tensor (see ``strategies.fedavg.FedAvgAccumulator.add_many``).
        """
        if self._flat is False:
            self._flat = None
            entries = sorted(self._entries.items(), key=lambda e: e[1][2])
            dtypes = {e[1][0] for e in entries}
            if len(dtypes) == 1 and entries:
                dtype = dtypes.pop()
                size = torch.empty((), dtype=dtype).element_size()
                at, start = entries[0][1][2], entries[0][1][2]
                packed = True
                for _, (_, _, offset, count) in entries:
                    packed = packed and offset == at
                    at = offset + count * size
                total = (at - start) // size
                if packed and total > 0:
                    self._flat = (torch.frombuffer(self._map, dtype=dtype, count=total, offset=start),
                                  tuple((k, e[1]) for k, e in entries))
        return self._flat  # type: ignore[return-value]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Key -> shape, from the header alone."""
        return {k: e[1] for k, e in self._entries.items()}


def map_state(path: str | Path) -> MappedState:
    """Map the safetensors file at ``path`` (see :class:`MappedState`)."""
    return MappedState(path)
