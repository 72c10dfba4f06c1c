"""Hostile uploads from enrolled sites: payloads, offsets and replays, each refused with its own status, audited,
never accepted; the coordinator keeps serving.

Sites: site-a sends bad payloads (never accepted), site-d bad offsets (never accepted), site-h replays (one update
accepted), site-f a resumed upload (accepted).
"""

from __future__ import annotations

import os
import time
from typing import Any

import grpc
import pytest
from attacker import (
    assert_healthy,
    envelope,
    payload_for,
    safetensors_bytes,
    sha256_hex,
    sign,
    upload_messages,
)
from conftest import Coordinator
from proto_client import Wire

SC = grpc.StatusCode


def _upload(coord: Coordinator, wire: Wire, site: str, signed: Any, payload: bytes, **kw: Any) -> Any:
    stub = wire.stub(coord.channel(coord.site(site)), "FederationService")
    return stub.UploadUpdate(upload_messages(wire, signed, payload, **kw), timeout=20)


def _refused(coord: Coordinator, wire: Wire, site: str, signed: Any, payload: bytes, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        _upload(coord, wire, site, signed, payload, **kw)
    return e.value


def _accepted(coord: Coordinator, site: str) -> list[tuple[Any, ...]]:
    return coord.db("SELECT payload_sha256, nonce FROM updates WHERE site=?", (site,))


def _audited_refusal(coord: Coordinator, site: str, status: str) -> None:
    recs = [r for r in coord.audit() if r["event"] == "update_refused" and r["fields"]["site"] == site]
    assert recs and recs[-1]["fields"]["status"] == status, recs[-1:] or "refusal not audited"


def _task_of(task: Any) -> Any:
    return task


def _tensor(task: Any, i: int = 0) -> Any:
    return task.adapter_spec.tensors[i]


PAYLOADS = {
    "bad-header-json": (lambda t: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", SC.INVALID_ARGUMENT),
    "header-length-past-end": (lambda t: (1 << 40).to_bytes(8, "little") + b"{}", SC.INVALID_ARGUMENT),
    "wrong-shape": (lambda t: payload_for(t, **{_tensor(t).name: (_tensor(t).dtype, [1, 1], 0.0)}),
                    SC.INVALID_ARGUMENT),
    "wrong-dtype": (lambda t: payload_for(t, **{_tensor(t).name: ("F16", list(_tensor(t).shape), 0.0)}),
                    SC.INVALID_ARGUMENT),
    "unknown-tensor": (lambda t: payload_for(t, **{"evil.weight": ("F32", [2], 0.0)}), SC.INVALID_ARGUMENT),
    "missing-tensor": (lambda t: safetensors_bytes({_tensor(t).name: (_tensor(t).dtype, list(_tensor(t).shape), 0.0)}),
                       SC.INVALID_ARGUMENT),
    "nan": (lambda t: payload_for(t, value=float("nan")), SC.INVALID_ARGUMENT),
    "inf": (lambda t: payload_for(t, value=float("inf")), SC.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(PAYLOADS))
def test_bad_payload_is_refused(coord: Coordinator, wire: Wire, task: Any, case: str) -> None:
    make, status = PAYLOADS[case]
    payload = make(task)
    signed = sign(wire, envelope(wire, task, "site-a", payload), coord.site("site-a").signer())
    assert _refused(coord, wire, "site-a", signed, payload).code() == status
    _audited_refusal(coord, "site-a", status.name)
    assert _accepted(coord, "site-a") == []
    assert_healthy(coord, wire)


def test_oversized_payload_is_resource_exhausted(coord: Coordinator, wire: Wire, task: Any) -> None:
    payload = payload_for(task)
    big = sign(wire, envelope(wire, task, "site-a", payload, payload_size=(1 << 20) + 1),
               coord.site("site-a").signer())
    assert _refused(coord, wire, "site-a", big, payload).code() == SC.RESOURCE_EXHAUSTED
    # Streaming more bytes than the envelope declares.
    short = sign(wire, envelope(wire, task, "site-a", payload, payload_size=len(payload) - 10),
                 coord.site("site-a").signer())
    assert _refused(coord, wire, "site-a", short, payload).code() == SC.RESOURCE_EXHAUSTED
    assert _accepted(coord, "site-a") == []


def test_size_or_hash_mismatch_vs_envelope_is_data_loss(coord: Coordinator, wire: Wire, task: Any) -> None:
    payload = payload_for(task)
    other = payload_for(task, value=0.5)
    signed = sign(wire, envelope(wire, task, "site-a", payload, payload_sha256=sha256_hex(other)),
                  coord.site("site-a").signer())
    assert _refused(coord, wire, "site-a", signed, payload).code() == SC.DATA_LOSS
    _audited_refusal(coord, "site-a", "DATA_LOSS")
    bigger = sign(wire, envelope(wire, task, "site-a", payload, payload_size=len(payload) + 8),
                  coord.site("site-a").signer())
    resp = _upload(coord, wire, "site-a", bigger, payload)  # short of the declared size: not accepted, resumable
    assert (resp.accepted, resp.committed_offset) == (False, len(payload))
    assert _accepted(coord, "site-a") == []


def test_envelope_signed_with_another_sites_key(coord: Coordinator, wire: Wire, task: Any) -> None:
    payload = payload_for(task)
    signed = sign(wire, envelope(wire, task, "site-a", payload), coord.site("site-b").signer())
    assert _refused(coord, wire, "site-a", signed, payload).code() == SC.UNAUTHENTICATED
    # Naming the other site, signed with the other site's key, sent on this site's certificate.
    signed = sign(wire, envelope(wire, task, "site-b", payload), coord.site("site-b").signer())
    assert _refused(coord, wire, "site-a", signed, payload).code() in (SC.UNAUTHENTICATED, SC.PERMISSION_DENIED)
    assert _accepted(coord, "site-a") == [] and _accepted(coord, "site-b") in ([], _accepted(coord, "site-b"))


@pytest.mark.parametrize("shift_s,ok", [(2 * 3600, False), (-50 * 60, True), (50 * 60, True), (-30 * 86400, False)],
                         ids=["2h-future", "50min-behind", "50min-ahead", "month-old"])
def test_created_unix_ms_window(coord: Coordinator, wire: Wire, task: Any, shift_s: int, ok: bool) -> None:
    payload = payload_for(task)
    created = int((time.time() + shift_s) * 1000)
    signed = sign(wire, envelope(wire, task, "site-a", payload, created_unix_ms=created,
                                 payload_size=len(payload) + 1),  # never completes: nothing is accepted
                  coord.site("site-a").signer())
    if ok:
        assert _upload(coord, wire, "site-a", signed, payload).accepted is False
    else:
        err = _refused(coord, wire, "site-a", signed, payload)
        assert err.code() == SC.FAILED_PRECONDITION and "created_unix_ms" in err.details()
        _audited_refusal(coord, "site-a", "FAILED_PRECONDITION")


def test_bad_offsets(coord: Coordinator, wire: Wire, task: Any) -> None:
    site, key = "site-d", coord.site("site-d").signer()
    payload = payload_for(task, value=0.25)
    req = wire.msg["UploadUpdateRequest"]
    stub = wire.stub(coord.channel(coord.site(site)), "FederationService")

    def stream(*msgs: Any) -> grpc.StatusCode:
        try:
            stub.UploadUpdate(iter(msgs), timeout=20)
        except grpc.RpcError as e:
            return e.code()
        return SC.OK

    signed = sign(wire, envelope(wire, task, site, payload), key)
    half = len(payload) // 2
    assert stream(req(envelope=signed, offset=(1 << 64) - 1, data=b"x")) == SC.OUT_OF_RANGE  # "negative" offset
    assert stream(req(envelope=signed, offset=1 << 40, data=b"x")) == SC.FAILED_PRECONDITION  # beyond held bytes
    assert stream(req(envelope=signed, offset=0, data=payload[:10]),
                  req(offset=20, data=payload[20:30])) == SC.INVALID_ARGUMENT  # gap
    assert stream(req(envelope=signed, offset=0, data=payload[:10]),
                  req(offset=5, data=payload[5:30])) == SC.INVALID_ARGUMENT  # overlap
    assert stream(req(offset=0, data=payload[:10])) == SC.INVALID_ARGUMENT  # no envelope first
    # Resume beyond the committed offset.
    status = stub.GetUploadStatus(wire.msg["GetUploadStatusRequest"](round=task.round,
                                                                      payload_sha256=sha256_hex(payload)), timeout=10)
    assert stream(req(envelope=signed, offset=status.committed_offset + 100, data=b"x")) == SC.FAILED_PRECONDITION
    assert stream(req(envelope=signed, offset=0, data=payload[:half])) == SC.OK
    assert stream(req(envelope=signed, offset=half + 1, data=payload[half + 1:])) == SC.FAILED_PRECONDITION
    assert _accepted(coord, site) == []
    assert_healthy(coord, wire)


def test_resumed_upload_is_accepted_once(coord: Coordinator, wire: Wire, task: Any) -> None:
    site = "site-f"
    payload = payload_for(task, value=0.125)
    signed = sign(wire, envelope(wire, task, site, payload), coord.site(site).signer())
    half = len(payload) // 2
    first = _upload(coord, wire, site, signed, payload[:half])
    assert (first.accepted, first.committed_offset) == (False, half)
    done = _upload(coord, wire, site, signed, payload, start=half)
    assert done.accepted and done.committed_offset == len(payload)
    assert _accepted(coord, site) == [(sha256_hex(payload), signed_nonce(wire, signed))]


def signed_nonce(wire: Wire, signed: Any) -> bytes:
    return wire.msg["UpdateEnvelope"].FromString(signed.envelope).nonce


def test_replays(coord: Coordinator, wire: Wire, task: Any) -> None:
    site, key = "site-h", coord.site("site-h").signer()
    payload = payload_for(task, value=0.0625)
    env = envelope(wire, task, site, payload)
    signed = sign(wire, env, key)
    assert _upload(coord, wire, site, signed, payload).accepted
    # The same signed envelope again: the same update (idempotent), never a second one.
    again = _upload(coord, wire, site, signed, payload)
    assert again.accepted and len(_accepted(coord, site)) == 1
    # A fresh, validly signed second update for the same round.
    other = payload_for(task, value=0.03125)
    err = _refused(coord, wire, site, sign(wire, envelope(wire, task, site, other), key), other)
    assert err.code() == SC.ALREADY_EXISTS
    _audited_refusal(coord, site, "ALREADY_EXISTS")
    # The accepted update's nonce re-signed by site-g for its own update: a replayed nonce.
    env_g = envelope(wire, task, "site-g", other, nonce=env.nonce)
    err = _refused(coord, wire, "site-g", sign(wire, env_g, coord.site("site-g").signer()), other)
    assert err.code() == SC.ALREADY_EXISTS
    # An envelope for a future round (a replay prepared for round N+1).
    future = sign(wire, envelope(wire, task, site, other, round=task.round + 1, nonce=os.urandom(16)), key)
    assert _refused(coord, wire, site, future, other).code() == SC.FAILED_PRECONDITION
    assert len(_accepted(coord, site)) == 1
    assert_healthy(coord, wire)
