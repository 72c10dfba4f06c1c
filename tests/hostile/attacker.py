"""The attacker's toolkit: mTLS channels, safetensors payloads and signed envelopes built from the .proto alone.

Nothing here imports the project's ``protos`` package, codec, tensors or client: payloads are written in the
safetensors layout by hand (8-byte little-endian header length, JSON header, raw little-endian data), envelopes are
the ``UpdateEnvelope`` message of the protoc-compiled descriptor pool, signed with Ed25519 over their serialised
bytes, exactly as the .proto comments describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from proto_client import Wire

MAX_MESSAGE = 64 << 20
_DTYPE = {"F32": ("<f", 4), "F16": ("<e", 2), "BF16": (None, 2)}


@dataclass(frozen=True)
class Identity:
    """A TLS client identity: certificate, key, and (for a site) its envelope-signing key file."""

    cert: bytes
    key: bytes
    signing_key: Path | None = None

    @classmethod
    def of_kit(cls, kit: Path) -> Identity:
        return cls((kit / "client.pem").read_bytes(), (kit / "client.key").read_bytes(), kit / "signing.key")

    def signer(self) -> Ed25519PrivateKey:
        assert self.signing_key is not None
        key = serialization.load_pem_private_key(self.signing_key.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key


def channel(port: int, ca: bytes, ident: Identity | None) -> grpc.Channel:
    """A channel to the coordinator on loopback; ``ident`` None offers no client certificate."""
    creds = (grpc.ssl_channel_credentials(root_certificates=ca) if ident is None else
             grpc.ssl_channel_credentials(root_certificates=ca, private_key=ident.key, certificate_chain=ident.cert))
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                                                   ("grpc.max_receive_message_length", MAX_MESSAGE)])


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], float]], *, header_extra: dict[str, Any] | None = None
                      ) -> bytes:
    """A safetensors file: ``{name: (dtype, shape, fill value)}``, written by hand."""
    header: dict[str, Any] = dict(header_extra or {})
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, value = tensors[name]
        fmt, size = _DTYPE[dtype]
        n = 1
        for d in shape:
            n *= d
        one = struct.pack("<f", value)[2:] if fmt is None else struct.pack(fmt, value)  # BF16: top half of F32
        blob = one * n
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def payload_for(task: Any, value: float = 0.001, **over: tuple[str, list[int], float]) -> bytes:
    """A well-formed update for the task's adapter spec (every tensor filled with ``value``), ``over`` replacing
    entries (or adding unknown ones)."""
    spec = {t.name: (t.dtype, list(t.shape), value) for t in task.adapter_spec.tensors}
    spec.update(over)
    return safetensors_bytes(spec)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def envelope(wire: Wire, task: Any, site: str, payload: bytes, **over: Any) -> Any:
    """An ``UpdateEnvelope`` for ``payload`` in the task's round (``over`` sets fields)."""
    env = wire.msg["UpdateEnvelope"](
        federation_id=task.federation_id, round=task.round, site=site, base_model_sha256=task.base_model_sha256,
        payload_sha256=sha256_hex(payload), payload_size=len(payload), nonce=os.urandom(16),
        payload_kind=wire.enums["PayloadKind"].values_by_name["PAYLOAD_KIND_DIFF"].number,
        adapter_spec_sha256=task.adapter_spec.sha256, num_examples=10, created_unix_ms=int(time.time() * 1000))
    for k, v in over.items():
        setattr(env, k, v)
    return env


def sign(wire: Wire, env: Any, key: Ed25519PrivateKey) -> Any:
    raw = env.SerializeToString()
    return wire.msg["SignedEnvelope"](envelope=raw, signature=key.sign(raw))


def upload_messages(wire: Wire, signed: Any, payload: bytes, *, chunk: int = 1 << 16, start: int = 0
                    ) -> Iterator[Any]:
    """The messages of one upload stream: the envelope in the first, then ``payload[start:]`` in chunks."""
    req = wire.msg["UploadUpdateRequest"]
    first = True
    off = start
    while first or off < len(payload):
        data = payload[off:off + chunk]
        yield req(envelope=signed, offset=off, data=data) if first else req(offset=off, data=data)
        first = False
        off += len(data)
        if not data:
            break


def status_of(fn: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    """The status a call ends with (OK when it returns); a streamed response is read to the end."""
    try:
        out = fn(*args, **kw)
        if hasattr(out, "__iter__") and not hasattr(out, "ListFields"):
            for _ in out:
                pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def assert_healthy(coord: Any, wire: Wire, site: str = "site-a") -> None:
    """The coordinator still serves an ordinary call of an enrolled site."""
    stub = wire.stub(coord.channel(coord.site(site)), "FederationService")
    resp = stub.Join(wire.msg["JoinRequest"](agent_version="hostile-suite", lora_rank=0), timeout=10)
    assert resp.site == site
