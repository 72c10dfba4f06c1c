from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcommon import tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.lora_A.weight": torch.randn(4, 16, generator=g), "layer.lora_B.weight": torch.randn(16, 4, generator=g)}


def test_state_roundtrip_is_exact_and_overhead_small() -> None:
    state = _state()
    data = tensors.encode_state(state)
    back = tensors.decode_state(data)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k])
    raw = sum(t.numel() * t.element_size() for t in state.values())
    assert raw < len(data) < raw + 300  # safetensors header only


def test_decode_rejects_garbage_and_pickle() -> None:
    with pytest.raises(codec.CodecError):
        tensors.decode_state(b"\x80\x04not safetensors")
    import io
    import pickle

    buf = io.BytesIO()
    pickle.dump({"a": torch.zeros(2)}, buf)
    with pytest.raises(codec.CodecError):
        tensors.decode_state(buf.getvalue())


def test_encode_rejects_empty_and_non_tensors() -> None:
    with pytest.raises(codec.CodecError, match="empty"):
        tensors.encode_state({})
    with pytest.raises(codec.CodecError, match="not a tensor"):
        tensors.encode_state({"x": [1, 2]})  # type: ignore[dict-item]


@pytest.mark.parametrize("size,chunk,offset", [(10, 3, 0), (10, 3, 4), (10, 10, 0), (0, 5, 0), (7, 100, 7)])
def test_chunks_cover_payload_from_offset(size: int, chunk: int, offset: int) -> None:
    data = bytes(range(size))
    parts = list(codec.iter_chunks(data, chunk, offset))
    assert b"".join(p for _, p in parts) == data[offset:]
    assert [o for o, _ in parts] == list(range(offset, size, chunk))
    assert all(len(p) <= chunk for _, p in parts)


def test_chunk_offset_out_of_range() -> None:
    with pytest.raises(codec.CodecError):
        list(codec.iter_chunks(b"abc", 2, 4))


def _envelope(payload: bytes) -> pb.UpdateEnvelope:
    return codec.make_envelope(federation_id="f", round=3, site="site-a", base_model_sha256="b" * 64, payload=payload,
                               adapter_spec_sha256="s" * 64, num_examples=12)


def test_sign_verify_roundtrip() -> None:
    key = Ed25519PrivateKey.generate()
    payload = tensors.encode_state(_state())
    env = _envelope(payload)
    signed = codec.sign_envelope(env, key)
    got = codec.verify_envelope(signed, key.public_key())
    assert (got.round, got.site, got.payload_sha256) == (3, "site-a", codec.sha256_hex(payload))
    assert len(got.nonce) == codec.NONCE_BYTES
    codec.check_payload(got, payload)


def test_nonces_are_fresh() -> None:
    assert _envelope(b"x").nonce != _envelope(b"x").nonce


def test_verify_rejects_tampering_and_wrong_key() -> None:
    key = Ed25519PrivateKey.generate()
    signed = codec.sign_envelope(_envelope(b"payload"), key)
    with pytest.raises(codec.SignatureError):
        codec.verify_envelope(signed, Ed25519PrivateKey.generate().public_key())
    env = pb.UpdateEnvelope.FromString(signed.envelope)
    env.round = 4  # a different round under the old signature
    forged = pb.SignedEnvelope(envelope=env.SerializeToString(), signature=signed.signature)
    with pytest.raises(codec.SignatureError):
        codec.verify_envelope(forged, key.public_key())


def test_check_payload_detects_size_and_hash_mismatch() -> None:
    env = _envelope(b"payload")
    with pytest.raises(codec.CodecError, match="bytes"):
        codec.check_payload(env, b"payloa")
    with pytest.raises(codec.CodecError, match="SHA-256"):
        codec.check_payload(env, b"pAyload")


def test_check_against_spec() -> None:
    state = _state()
    spec = tensors.make_adapter_spec(state, rank=4, alpha=8, dropout=0, target_modules=["layer"])
    tensors.check_against_spec(state, spec)
    assert spec.sha256 == codec.adapter_spec_sha256(spec)
    cases = [
        ({**state, "extra": torch.zeros(1)}, "outside the adapter spec"),
        ({"layer.lora_A.weight": state["layer.lora_A.weight"]}, "lacks"),
        ({**state, "layer.lora_A.weight": torch.zeros(4, 15)}, "shape"),
        ({**state, "layer.lora_A.weight": torch.zeros(4, 16, dtype=torch.float16)}, "dtype"),
        ({**state, "layer.lora_A.weight": torch.full((4, 16), float("nan"))}, "NaN"),
        ({**state, "layer.lora_B.weight": torch.full((16, 4), float("inf"))}, "NaN or Inf"),
    ]
    for bad, msg in cases:
        with pytest.raises(codec.CodecError, match=msg):
            tensors.check_against_spec(bad, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_element_anywhere_is_refused_in_every_float_dtype(dtype: torch.dtype, bad: float) -> None:
    """A single NaN or +-Inf, at the first, a middle or the last element, in any float dtype, names its tensor."""
    state = {"a.lora_A.weight": torch.randn(8, 300).to(dtype), "a.lora_B.weight": torch.randn(300, 8).to(dtype)}
    spec = tensors.make_adapter_spec(state, rank=8, alpha=8, dropout=0, target_modules=["a"])
    tensors.check_against_spec(state, spec)
    for at in (0, 1234, 2399):
        hurt = {k: v.clone() for k, v in state.items()}
        hurt["a.lora_B.weight"].view(-1)[at] = bad
        with pytest.raises(codec.NonFiniteError, match="'a.lora_B.weight' holds NaN or Inf"):
            tensors.check_against_spec(hurt, spec)


def test_header_cache_rechecks_whenever_the_data_length_differs() -> None:
    """A header validated once is remembered by its bytes AND the data length after it: the same header before
    fewer bytes (a truncated file) is checked again and refused, never answered from the cache."""
    data = tensors.encode_state({"a": torch.ones(64), "b": torch.zeros(3, 5)})
    first = codec.check_header(data)
    assert codec.check_header(data) == first
    with pytest.raises(codec.CodecError, match="data offsets outside"):
        codec.check_header(data[:-4])
    longer = data + b"\0" * 4  # data past the last tensor is not an error, and not the cached answer either
    assert codec.check_header(longer) == first


def test_header_cache_is_bounded_and_never_changes_an_answer() -> None:
    seen = []
    for i in range(codec._CHECKED_MAX * 3):
        data = tensors.encode_state({f"t{i}": torch.ones(i + 1)})
        seen.append((data, codec.check_header(data)))
    assert len(codec._CHECKED) <= codec._CHECKED_MAX
    for data, entries in seen:  # evicted or not, the same bytes give the same entries
        assert codec.check_header(data) == entries
    dup = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    bad = len(dup).to_bytes(8, "little") + dup + b"\0" * 4
    for _ in range(2):  # a refused header is not remembered as good
        with pytest.raises(codec.CodecError, match="twice"):
            codec.check_header(bad)
