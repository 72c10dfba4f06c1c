"""Memory-mapped safetensors states: equal to a decode, zero copy, and strict about malformed headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from coordinator.rounds.mapped import map_state
from fedcommon import tensors
from protos import codec


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_A.weight": torch.randn(4, 16, generator=g), "a.lora_B.weight": torch.randn(16, 4, generator=g),
            "h": torch.randn(3, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 5)}


def test_mapped_state_equals_decode(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "u.safetensors"
    path.write_bytes(tensors.encode_state(state))
    mapped = map_state(path)
    assert set(mapped) == set(state) and mapped.shapes()["a.lora_B.weight"] == (16, 4)
    for k, v in state.items():
        assert mapped[k].dtype == v.dtype and torch.equal(mapped[k], v)


def test_mapped_tensors_are_views_of_one_mapping_not_copies(tmp_path: Path) -> None:
    path = tmp_path / "u.safetensors"
    path.write_bytes(tensors.encode_state(_state()))
    mapped = map_state(path)
    t1, t2 = mapped["a.lora_A.weight"], mapped["a.lora_A.weight"]
    assert t1.data_ptr() == t2.data_ptr()  # both point into the map
    t1.mul_(0)  # private copy-on-write pages: the file is untouched
    assert torch.equal(tensors.decode_state(path.read_bytes())["a.lora_A.weight"], _state()["a.lora_A.weight"])


def _file(tmp_path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(("header", "data", "match"), [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not match its byte range"),
    ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "cannot travel on the wire"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"__metadata__": {"format": "pt"}}, b"", "no tensors"),
])
def test_malformed_headers_are_refused_with_the_tensor_named(tmp_path: Path, header: dict[str, object], data: bytes,
                                                             match: str) -> None:
    with pytest.raises(codec.CodecError, match=match):
        map_state(_file(tmp_path, header, data))


def test_header_length_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(codec.CodecError, match="exceeds the payload"):
        map_state(path)
