"""Seeded fuzzing of everything an update passes through at the coordinator.

1. The codec, in-process: >= 100k random and mutated payloads and envelopes through ``decode_state``,
   ``check_against_spec``, ``l2_norm``, ``verify_envelope`` and ``check_payload``. Only ``CodecError`` may come out.
2. The servicer's code path, in-process: mutated chunk streams through ``RoundEngine.ingress.receive_upload`` (the one domain
   call behind ``UploadUpdate``) on a real store. Only ``CoordinatorError`` with a specific status may come out, and
   nothing refused is ever stored.
3. Over the wire: a smaller batch of mutated streams and raw garbage messages at a real coordinator over mTLS. Every
   answer is a gRPC status other than UNKNOWN, and the coordinator still serves a valid update afterwards.

A plain seeded ``random.Random`` drives the mutations (hypothesis' shrinking machinery is too slow for 100k cases in a
unit-test budget); a failure message carries the seed and case index, so every case replays exactly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from live_coordinator import LiveCoordinator, delta, small_init, upload_messages

from coordinator.config import FederationConfig, TlsSpec
from coordinator.errors import CoordinatorError
from coordinator.ingress.uploads import Chunk
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.trust.pki import PeerIdentity
from fedcommon import tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.clipping import l2_norm

SEED = int(os.environ.get("FEDBRIDGE_FUZZ_SEED", "20261128"))
N_CODEC = int(os.environ.get("FEDBRIDGE_FUZZ_CODEC", "100000"))
N_ENGINE = int(os.environ.get("FEDBRIDGE_FUZZ_ENGINE", "5000"))
N_WIRE = int(os.environ.get("FEDBRIDGE_FUZZ_WIRE", "300"))
BASE_SHA = "ab" * 32
INIT = small_init()
SPEC = INIT.spec
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "C64",
          "", "f32", None, 7, ["F32"]]


# -- mutators ---------------------------------------------------------------------------------------------------------
def _st_bytes(header: object, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 16)]
        elif op == 4:
            b = b[:rng.randrange(len(b) + 1)]
        elif op == 5 and len(b) >= 8:  # the safetensors header length: huge, zero, off by a little
            n = rng.choice([0, 1, 2**63, 2**64 - 1, len(b), len(b) - 8 + rng.randint(-3, 3), rng.getrandbits(40)])
            b[:8] = struct.pack("<Q", n % 2**64)
        else:
            b += rng.randbytes(rng.randint(1, 32))
    return bytes(b)


def mutate_header(rng: random.Random, payload: bytes) -> bytes:
    """Structured mutation of a valid safetensors payload's JSON header."""
    n = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8:8 + n])
    body = payload[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    op = rng.randrange(9)
    if op == 0:
        header[name]["dtype"] = rng.choice(DTYPES)
    elif op == 1:
        header[name]["shape"] = rng.choice([[-1, 4], [2**40, 2**40], [2, 4, 1], [], [0], ["2", 4], [2.0, 4],
                                            [2**64, 1], [1] * 40])
    elif op == 2:
        header[name]["data_offsets"] = rng.choice([[0, 2**64], [2**63, 2**63 + 32], [-8, 24], [32, 0],
                                                   [0, len(body) + 1], [0], "0-32", [0.0, 32.0]])
    elif op == 3:
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 4:
        header["__metadata__"] = rng.choice([{"a": 1}, [], "x", {"format": "pt"}, None])
    elif op == 5:
        header[name + "x" * rng.randint(1, 3)] = header.pop(name)  # an unknown key
    elif op == 6:
        header = rng.choice([[], "x", 1, None, {name: None}])
    elif op == 7:
        raw = json.dumps(header)
        dup = raw[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"  # the same tensor twice
        h = dup.encode()
        return struct.pack("<Q", len(h)) + h + body
    else:
        body = body[:rng.randrange(len(body) + 1)]
    return _st_bytes(header, body)


def mutate_envelope(rng: random.Random, env: pb.UpdateEnvelope) -> bytes:
    e = pb.UpdateEnvelope()
    e.CopyFrom(env)
    op = rng.randrange(10)
    if op == 0:
        e.round = rng.choice([0, 2, 2**64 - 1, rng.getrandbits(32)])
    elif op == 1:
        e.payload_size = rng.choice([0, 2**64 - 1, e.payload_size + 1, rng.getrandbits(20)])
    elif op == 2:
        e.nonce = rng.randbytes(rng.choice([0, 1, 15, 17, 64]))
    elif op == 3:
        e.payload_sha256 = rng.choice(["", "../../../etc/passwd", "A" * 64, "0" * 63, "é" * 64, "0" * 64])
    elif op == 4:
        e.epsilon_spent = rng.choice([float("nan"), float("inf"), -1.0, 1e308])
    elif op == 5:
        e.num_examples = rng.choice([0, 2**64 - 1])
    elif op == 6:
        e.payload_kind = rng.choice([0, 2, 99])
    elif op == 7:
        e.site = rng.choice(["", "site-b", "a" * 500, "\x00"])
    elif op == 8:
        e.federation_id = rng.choice(["", "other", "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")])
    else:
        return mutate_bytes(rng, e.SerializeToString())
    return e.SerializeToString()


# -- 1. the codec -----------------------------------------------------------------------------------------------------
def test_codec_survives_100k_random_and_mutated_inputs() -> None:
    rng = random.Random(SEED)
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    payload = tensors.encode_state(delta(0.5, -0.25))
    env = codec.make_envelope(federation_id="fed", round=1, site="a", base_model_sha256=BASE_SHA, payload=payload,
                              adapter_spec_sha256=SPEC.sha256, num_examples=3)
    signed = codec.sign_envelope(env, key)
    outcomes = {"ok": 0, "refused": 0}
    started = time.perf_counter()
    for i in range(N_CODEC):
        kind = i % 4
        try:
            if kind == 0:
                data = mutate_bytes(rng, payload) if rng.random() < 0.5 else mutate_header(rng, payload)
                state = tensors.decode_state(data)
                tensors.check_against_spec(state, SPEC)
                l2_norm(state)
            elif kind == 1:
                data = rng.randbytes(rng.randint(0, 96)) if rng.random() < 0.3 else mutate_bytes(rng, payload)
                codec.check_payload(env, data)
                tensors.decode_state(data)
            elif kind == 2:  # a forger: bytes and signatures that the key never signed
                raw = mutate_envelope(rng, env) if rng.random() < 0.7 else mutate_bytes(rng, signed.envelope)
                sig = signed.signature if rng.random() < 0.5 else mutate_bytes(rng, signed.signature)
                codec.verify_envelope(pb.SignedEnvelope(envelope=raw, signature=sig), pub)
            else:  # a malicious enrolled site: whatever it signs verifies, so the parser and checks must hold
                raw = mutate_envelope(rng, env)
                got = codec.verify_envelope(pb.SignedEnvelope(envelope=raw, signature=key.sign(raw)), pub)
                codec.check_payload(got, payload)
            outcomes["ok"] += 1
        except codec.CodecError:
            outcomes["refused"] += 1
        except Exception as e:  # pragma: no cover - this is the bug report
            pytest.fail(f"seed={SEED} case={i} kind={kind}: unhandled {type(e).__name__}: {e}")
    elapsed = time.perf_counter() - started
    print(f"\ncodec fuzz: {N_CODEC} cases in {elapsed:.1f}s ({N_CODEC / elapsed:.0f}/s) {outcomes}")
    assert outcomes["refused"] > N_CODEC // 2 and outcomes["ok"] > 0  # both paths were exercised


# -- 2. the servicer's code path in-process ---------------------------------------------------------------------------
def _fuzz_stream(rng: random.Random, site: Ed25519PrivateKey, payload: bytes, env: pb.UpdateEnvelope,
                 signed: pb.SignedEnvelope) -> list[Chunk]:
    op = rng.randrange(8)
    if op == 0:  # garbage envelope, validly signed by the site
        raw = mutate_envelope(rng, env)
        first = pb.SignedEnvelope(envelope=raw, signature=site.sign(raw))
    elif op == 1:  # forged signature
        first = pb.SignedEnvelope(envelope=signed.envelope, signature=mutate_bytes(rng, signed.signature))
    elif op == 2:
        first = None  # type: ignore[assignment]
    else:
        first = signed
    data = payload
    if op in (3, 4):  # a payload that matches its (re-signed) envelope but is hostile inside
        data = mutate_header(rng, payload) if op == 3 else mutate_bytes(rng, payload)
        e = pb.UpdateEnvelope()
        e.CopyFrom(env)
        e.payload_sha256, e.payload_size, e.nonce = codec.sha256_hex(data), len(data), codec.new_nonce()
        raw = e.SerializeToString()
        first = pb.SignedEnvelope(envelope=raw, signature=site.sign(raw))
    size = rng.choice([7, 64, 4096])
    chunks = [Chunk(first if i == 0 else None, off, d) for i, (off, d) in enumerate(codec.iter_chunks(data, size))]
    if op == 5 and chunks:  # offsets: gaps, overlaps, uint64 extremes; envelope repeated or late
        j = rng.randrange(len(chunks))
        c = chunks[j]
        chunks[j] = Chunk(rng.choice([c.signed, signed, None]),
                          rng.choice([0, c.offset + 1, 2**64 - 1, 2**63, max(0, c.offset - 1)]), c.data)
    elif op == 6:
        chunks = chunks[:rng.randrange(len(chunks) + 1)]  # cut short (or empty)
    elif op == 7 and chunks:
        chunks.append(Chunk(None, len(data), rng.randbytes(rng.randint(1, 64))))  # beyond the declared size
    return chunks


async def _aiter(chunks: list[Chunk]) -> AsyncIterator[Chunk]:
    for c in chunks:
        yield c


def test_servicer_path_refuses_mutated_streams_cleanly() -> None:
    rng = random.Random(SEED + 1)
    # State on tmpfs when there is one: the refusals are fsynced audit records, and this test is about parsing.
    tmp = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    statuses: dict[str, int] = {}

    async def main() -> None:
        cfg = FederationConfig(federation_id="fed", base_model=Path(tmp) / "base", state_dir=Path(tmp) / "state",
                               registry_dir=Path(tmp) / "reg", tls=TlsSpec(Path("c"), Path("c"), Path("k")),
                               rounds=1, min_sites=10_000, max_update_bytes=1 << 16, max_update_norm=50.0)
        eng = RoundEngine(cfg, Store(cfg.state_dir), BASE_SHA, INIT)
        await eng.start()
        key = Ed25519PrivateKey.generate()
        peer = PeerIdentity("a", "site", key.public_key(), 1, "fp-a")
        payload = tensors.encode_state(delta(0.5, -0.25))
        env = codec.make_envelope(federation_id="fed", round=1, site="a", base_model_sha256=BASE_SHA,
                                  payload=payload, adapter_spec_sha256=SPEC.sha256, num_examples=3)
        signed = codec.sign_envelope(env, key)
        for i in range(N_ENGINE):
            chunks = _fuzz_stream(rng, key, payload, env, signed)
            try:
                res = await eng.ingress.receive_upload(peer, _aiter(chunks))
                outcome = "accepted" if res.accepted else "partial"
                statuses[outcome] = statuses.get(outcome, 0) + 1
                if res.accepted:  # the one well-formed update: remove it so the fuzzing can go on
                    eng.store._db.execute("DELETE FROM updates")
            except CoordinatorError as e:
                assert e.status not in ("INTERNAL", "UNKNOWN"), f"seed={SEED + 1} case={i}: {e!r}"
                assert hasattr(grpc.StatusCode, e.status)
                statuses[e.status] = statuses.get(e.status, 0) + 1
            except Exception as e:  # pragma: no cover - this is the bug report
                pytest.fail(f"seed={SEED + 1} case={i}: unhandled {type(e).__name__}: {e}")
        eng.store.close()

    started = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - started
    print(f"\nservicer-path fuzz: {N_ENGINE} streams in {elapsed:.1f}s ({N_ENGINE / elapsed:.0f}/s) {statuses}")
    for status in ("UNAUTHENTICATED", "INVALID_ARGUMENT", "DATA_LOSS", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"):
        assert statuses.get(status, 0) > 0, statuses  # the mutations reach every check


# -- 3. over the wire -------------------------------------------------------------------------------------------------
@pytest.fixture()
def live(tmp_path: Path) -> Iterator[LiveCoordinator]:
    c = LiveCoordinator(tmp_path, max_update_bytes=1 << 16, min_sites=10)
    yield c
    c.close()


def test_wire_fuzz_gets_clean_statuses_and_the_coordinator_keeps_serving(live: LiveCoordinator) -> None:
    rng = random.Random(SEED + 2)
    key = live.signing_key("site-a")
    signed, payload = live.update("site-a")
    env = pb.UpdateEnvelope.FromString(signed.envelope)
    stub = live.site_stub("site-a")
    raw_upload = live._channels[-1].stream_unary(
        "/fedbridge.v1.FederationService/UploadUpdate", request_serializer=lambda b: b,
        response_deserializer=pb.UploadUpdateResponse.FromString)
    codes: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(N_WIRE):
        try:
            if i % 5 == 4:  # bytes that are not even a protobuf message of the right type
                msgs = [mutate_bytes(rng, pb.UploadUpdateRequest(envelope=signed, offset=0, data=payload[:64])
                                     .SerializeToString()) for _ in range(rng.randint(1, 3))]
                raw_upload(iter(msgs), timeout=10)
            else:
                chunks = _fuzz_stream(rng, key, payload, env, signed)
                stub.UploadUpdate(iter([pb.UploadUpdateRequest(envelope=c.signed, offset=c.offset, data=c.data)
                                        for c in chunks]), timeout=10)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as e:
            code = e.code()
            assert code != grpc.StatusCode.UNKNOWN, f"seed={SEED + 2} case={i}: {e.details()}"
            codes[code.name] = codes.get(code.name, 0) + 1
    elapsed = time.perf_counter() - started
    print(f"\nwire fuzz: {N_WIRE} streams in {elapsed:.1f}s {codes}")
    # Still serving: a fresh valid update from site-b is accepted.
    good, good_payload = live.update("site-b")
    assert live.site_stub("site-b").UploadUpdate(upload_messages(good, good_payload), timeout=10).accepted
    assert codes.get("UNAUTHENTICATED", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0
    assert "INTERNAL" not in codes, codes  # non-protobuf stream messages are INVALID_ARGUMENT too


def test_state_dict_cannot_smuggle_a_torch_pickle() -> None:
    """A torch.save pickle in place of safetensors is refused by the header check (no unpickling, ever)."""
    import io

    buf = io.BytesIO()
    torch.save(delta(), buf)
    with pytest.raises(codec.CodecError):
        tensors.decode_state(buf.getvalue())
