"""Compressed update encodings: round trips within the per-block error bound, strict decoding, error feedback."""

from __future__ import annotations

import math

import pytest
import torch

from fedcommon import compress, tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

# Worst-case |x - dq(q(x))| as a fraction of the block's absmax (plus float32 rounding).
BOUND = {"int8": 1 / 127 / 2, "int4": 1 / 7 / 2,
         "nf4": max(b - a for a, b in zip(compress.NF4_LEVELS, compress.NF4_LEVELS[1:], strict=False)) / 2}


def _state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": (torch.randn(4, 33, generator=g) * 0.1).to(dtype),  # 132 values: a partial block
            "m.lora_B.weight": (torch.randn(17, 3, generator=g) * 3).to(dtype)}  # odd count: a padding nibble


def _spec(state: dict[str, torch.Tensor], encoding: str, block: int = 16, topk: float = 0.0) -> pb.AdapterSpec:
    return tensors.make_adapter_spec(state, 4, 8.0, 0.0, ["q_proj"], compress.compression(encoding, block, topk))


@pytest.mark.parametrize("encoding", ["int8", "int4", "nf4"])
def test_round_trip_within_the_per_block_bound(encoding: str) -> None:
    state = _state()
    spec = _spec(state, encoding)
    enc = compress.encode(state, spec.compression)
    codec.check_header(tensors.encode_state(enc))
    dec = compress.decode(tensors.decode_state(tensors.encode_state(enc)), spec)
    for name, x in state.items():
        err = (x - dec[name]).reshape(-1)
        xs = x.reshape(-1)
        for start in range(0, xs.numel(), 16):
            absmax = float(xs[start:start + 16].abs().max())
            assert float(err[start:start + 16].abs().max()) <= absmax * BOUND[encoding] * (1 + 1e-5) + 1e-7
        assert dec[name].shape == x.shape and dec[name].dtype == x.dtype


def test_int8_bytes_and_zero_blocks() -> None:
    state = {"a": torch.zeros(256)}
    spec = _spec(state, "int8", block=128)
    enc = compress.encode(state, spec.compression)
    assert enc["a.q"].dtype == torch.int8 and enc["a.q"].numel() == 256 and enc["a.absmax"].numel() == 2
    assert torch.equal(compress.decode(enc, spec)["a"], state["a"])


def test_topk_keeps_the_largest_and_sorts_indices() -> None:
    x = torch.zeros(1000)
    x[[3, 500, 999, 42, 7, 8, 9, 10, 11, 12]] = torch.arange(1, 11, dtype=torch.float32)
    state = {"a": x}
    spec = _spec(state, "int8", 16, 0.01)
    enc = compress.encode(state, spec.compression)
    assert enc["a.idx"].tolist() == sorted([3, 500, 999, 42, 7, 8, 9, 10, 11, 12])
    dec = compress.decode(enc, spec)["a"]
    assert torch.allclose(dec, x, atol=10 / 254 + 1e-6)
    assert codec.topk_count(1000, 0.01) == 10 and codec.topk_count(5, 0.01) == 1


def test_spec_hash_covers_compression_and_dense_hash_is_unchanged() -> None:
    state = _state()
    dense = tensors.make_adapter_spec(state, 4, 8.0, 0.0, ["q_proj"])
    assert not dense.HasField("compression")
    hashes = {dense.sha256, _spec(state, "int8").sha256, _spec(state, "int4").sha256, _spec(state, "int8", 32).sha256,
              _spec(state, "int8", 16, 0.01).sha256}
    assert len(hashes) == 5


def _bad(enc: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    out = dict(enc)
    out[key] = value
    return out


@pytest.mark.parametrize("case", ["nan_absmax", "neg_absmax", "int8_minus128", "int4_code0", "padding_nibble",
                                  "idx_range", "idx_order", "idx_dup", "idx_count", "q_length", "absmax_length",
                                  "missing", "extra", "dense_in_compressed", "q_dtype"])
def test_decode_refuses_malformed_encodings(case: str) -> None:
    state = _state()
    enc8 = compress.encode(state, _spec(state, "int8").compression)
    spec4 = _spec(state, "int4")
    enc4 = compress.encode(state, spec4.compression)
    spec_k = _spec(state, "int8", 16, 0.1)
    enck = compress.encode(state, spec_k.compression)
    a, b = "m.lora_A.weight", "m.lora_B.weight"
    spec, enc = _spec(state, "int8"), enc8
    if case == "nan_absmax":
        enc = _bad(enc8, a + ".absmax", torch.full_like(enc8[a + ".absmax"], math.nan))
    elif case == "neg_absmax":
        enc = _bad(enc8, a + ".absmax", -enc8[a + ".absmax"])
    elif case == "int8_minus128":
        enc = _bad(enc8, a + ".q", torch.full_like(enc8[a + ".q"], -128))
    elif case == "int4_code0":
        spec, enc = spec4, _bad(enc4, a + ".q", torch.zeros_like(enc4[a + ".q"]) | 0x80)
    elif case == "padding_nibble":
        q = enc4[b + ".q"].clone()
        q[-1] |= 0x80
        spec, enc = spec4, _bad(enc4, b + ".q", q)
    elif case == "idx_range":
        idx = enck[a + ".idx"].clone()
        idx[-1] = 132
        spec, enc = spec_k, _bad(enck, a + ".idx", idx)
    elif case == "idx_order":
        spec, enc = spec_k, _bad(enck, a + ".idx", enck[a + ".idx"].flip(0).contiguous())
    elif case == "idx_dup":
        idx = enck[a + ".idx"].clone()
        idx[1] = idx[0]
        spec, enc = spec_k, _bad(enck, a + ".idx", idx)
    elif case == "idx_count":
        spec, enc = spec_k, _bad(enck, a + ".idx", enck[a + ".idx"][:-1].contiguous())
    elif case == "q_length":
        enc = _bad(enc8, a + ".q", enc8[a + ".q"][:-1].contiguous())
    elif case == "absmax_length":
        enc = _bad(enc8, a + ".absmax", torch.cat([enc8[a + ".absmax"], torch.ones(1)]))
    elif case == "missing":
        enc = {k: v for k, v in enc8.items() if k != b + ".absmax"}
    elif case == "extra":
        enc = _bad(enc8, "m.other.q", torch.zeros(3, dtype=torch.int8))
    elif case == "dense_in_compressed":
        enc = dict(state)
    elif case == "q_dtype":
        enc = _bad(enc8, a + ".q", enc8[a + ".q"].to(torch.uint8))
    with pytest.raises(codec.CodecError):
        compress.decode(enc, spec)


@pytest.mark.parametrize("encoding,topk", [("int8", 0.0), ("int4", 0.0), ("int8", 0.05)])
def test_error_feedback_telescopes(encoding: str, topk: float) -> None:
    """Sum of what was sent over rounds = sum of the true deltas minus the last residual (one round's error)."""
    spec = _spec(_state(), encoding, 16, topk)
    res = {k: torch.zeros_like(v) for k, v in _state().items()}
    true_sum = {k: torch.zeros_like(v) for k, v in res.items()}
    sent_sum = {k: torch.zeros_like(v) for k, v in res.items()}
    for r in range(20):
        delta = _state(seed=r + 1)
        x = {k: delta[k] + res[k] for k in delta}
        enc = compress.encode(x, spec.compression)
        sent = compress.decode(enc, spec)
        res = compress.residual(x, enc, spec)
        for k in delta:
            true_sum[k] += delta[k]
            sent_sum[k] += sent[k]
    for k in true_sum:
        assert torch.allclose(sent_sum[k] + res[k], true_sum[k], atol=1e-4)
        if not topk:  # the gap stays one round's quantisation error, it does not grow with the rounds
            bound = float(_state(seed=20)[k].abs().max() + res[k].abs().max()) * BOUND[encoding] * 2
            assert float((sent_sum[k] - true_sum[k]).abs().max()) <= bound


def test_bf16_spec_decodes_to_bf16() -> None:
    state = _state(dtype=torch.bfloat16)
    spec = _spec(state, "int8")
    assert compress.decode(compress.encode(state, spec.compression), spec)["m.lora_A.weight"].dtype == torch.bfloat16


def test_check_compression_refuses_bad_parameters() -> None:
    for c in [pb.Compression(encoding="int3", block_size=64), pb.Compression(encoding="int8", block_size=63),
              pb.Compression(encoding="int8", block_size=0), pb.Compression(encoding="int8", block_size=64, topk_fraction=1.0),
              pb.Compression(encoding="int8", block_size=64, topk_fraction=math.nan)]:
        with pytest.raises(codec.CodecError):
            codec.check_compression(c)
