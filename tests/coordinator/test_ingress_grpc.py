"""Every hostile update is refused over real mTLS with its own gRPC status and an audit record, and never touches
the round; enrolment, revocation (admin call and CRL file) and the cut-off of open streams and long-polls.

Status map (coordinator/errors.py): bad signature UNAUTHENTICATED, replayed nonce ALREADY_EXISTS, old/future round
FAILED_PRECONDITION, payload hash/size mismatch DATA_LOSS, unknown keys / shapes / dtypes / NaN / Inf
INVALID_ARGUMENT, norm above max_update_norm OUT_OF_RANGE, oversized RESOURCE_EXHAUSTED, unenrolled or revoked
PERMISSION_DENIED.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from live_coordinator import LiveCoordinator, delta, upload_messages

from coordinator.trust.enrolment import revoke_site
from coordinator.trust.pki import CertificateAuthority
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

SC = grpc.StatusCode


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[LiveCoordinator]:
    c = LiveCoordinator(tmp_path, max_update_bytes=4096, max_update_norm=5.0)
    yield c
    c.close()


def _upload(live: LiveCoordinator, site: str, signed: pb.SignedEnvelope, payload: bytes) -> pb.UploadUpdateResponse:
    return live.site_stub(site).UploadUpdate(upload_messages(signed, payload), timeout=20)


def _refused(live: LiveCoordinator, site: str, signed: pb.SignedEnvelope, payload: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        _upload(live, site, signed, payload)
    return e.value


def _assert_untouched(live: LiveCoordinator, accepted: list[str] | None = None) -> None:
    store = live.engine.store
    assert [u.site for u in store.updates(1)] == (accepted or [])
    assert [r.state for r in store.rounds()] == ["open"]
    assert not store.adapter_path(2).exists()  # no aggregate was produced


def _last_refusal(live: LiveCoordinator) -> dict:
    recs = [r for r in live.audit_records() if r["event"] == "update_refused"]
    assert recs, "refusal not audited"
    return recs[-1]["fields"]


@pytest.mark.parametrize("case,status", [
    ("bad_signature", SC.UNAUTHENTICATED),
    ("foreign_key", SC.UNAUTHENTICATED),
    ("future_round", SC.FAILED_PRECONDITION),
    ("hash_mismatch", SC.DATA_LOSS),
    ("unknown_key", SC.INVALID_ARGUMENT),
    ("wrong_shape", SC.INVALID_ARGUMENT),
    ("wrong_dtype", SC.INVALID_ARGUMENT),
    ("nan", SC.INVALID_ARGUMENT),
    ("inf", SC.INVALID_ARGUMENT),
    ("norm_above_bound", SC.OUT_OF_RANGE),
    ("oversized_declared", SC.RESOURCE_EXHAUSTED),
    ("oversized_stream", SC.RESOURCE_EXHAUSTED),
    ("other_sites_name", SC.PERMISSION_DENIED),
    ("wrong_base_model", SC.INVALID_ARGUMENT),
    ("garbage_payload", SC.INVALID_ARGUMENT),
    ("path_as_payload_hash", SC.INVALID_ARGUMENT),
    ("huge_num_examples", SC.INVALID_ARGUMENT),
])
def test_hostile_update_is_refused_with_its_status_and_audited(live: LiveCoordinator, case: str,
                                                               status: grpc.StatusCode) -> None:
    # Prepare
    state = delta()
    over: dict = {}
    key = None
    if case == "unknown_key":
        state["l.extra.weight"] = torch.zeros(2)
    elif case == "wrong_shape":
        state["l.lora_A.weight"] = torch.zeros(3, 4)
    elif case == "wrong_dtype":
        state["l.lora_A.weight"] = state["l.lora_A.weight"].to(torch.float16)
    elif case == "nan":
        state["l.lora_A.weight"][0, 0] = float("nan")
    elif case == "inf":
        state["l.lora_B.weight"][1, 1] = float("-inf")
    elif case == "norm_above_bound":
        state = delta(3.0, 3.0)  # sqrt(16 * 9) = 12 > 5
    elif case == "future_round":
        over["round"] = 2
    elif case == "oversized_declared":
        over["payload_size"] = 10_000
    elif case == "other_sites_name":
        over["site"] = "site-b"
    elif case == "wrong_base_model":
        over["base_model_sha256"] = "cd" * 32
    elif case == "foreign_key":
        key = Ed25519PrivateKey.generate()
    elif case == "path_as_payload_hash":  # the hash names the partial-upload file: it must never be a path
        over["payload_sha256"] = "../../../../tmp/fedbridge-owned"
    elif case == "huge_num_examples":
        over["num_examples"] = 2**64 - 1
    signed, payload = live.update("site-a", state, key=key, **over)
    if case == "bad_signature":
        signed = pb.SignedEnvelope(envelope=signed.envelope, signature=bytes(64))
    elif case == "hash_mismatch":
        payload = payload[:-1] + bytes([payload[-1] ^ 1])
    elif case == "oversized_stream":
        payload = payload + b"\0" * 16  # more bytes than the signed envelope declares
    elif case == "garbage_payload":
        payload = b"\xff" * 64
        env = pb.UpdateEnvelope.FromString(signed.envelope)
        env.payload_sha256, env.payload_size = codec.sha256_hex(payload), len(payload)
        signed = codec.sign_envelope(env, live.signing_key("site-a"))

    # Execute
    err = _refused(live, "site-a", signed, payload)

    # Assert
    assert err.code() == status, err.details()
    _assert_untouched(live)
    fields = _last_refusal(live)
    assert fields["site"] == "site-a" and fields["status"] == status.name


def test_replayed_nonce_and_old_round(live: LiveCoordinator) -> None:
    # Prepare: site-a's update is accepted in round 1
    signed_a, payload_a = live.update("site-a")
    assert _upload(live, "site-a", signed_a, payload_a).accepted
    nonce = pb.UpdateEnvelope.FromString(signed_a.envelope).nonce

    # Execute / Assert: site-b signs its own envelope reusing that nonce -> ALREADY_EXISTS, not counted
    signed_b, payload_b = live.update("site-b", nonce=nonce)
    assert _refused(live, "site-b", signed_b, payload_b).code() == SC.ALREADY_EXISTS
    _assert_untouched(live, accepted=["site-a"])

    # site-b sends a fresh one: round 1 closes; then a round-1 update is an old round
    signed_b, payload_b = live.update("site-b")
    assert _upload(live, "site-b", signed_b, payload_b).accepted
    deadline = time.monotonic() + 10
    while live.engine.store.current_round().round != 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.05)
    late, late_payload = live.update("site-a", delta(0.2, 0.2), round=1)
    err = _refused(live, "site-a", late, late_payload)
    assert err.code() == SC.FAILED_PRECONDITION
    assert [u.site for u in live.engine.store.updates(1)] == ["site-a", "site-b"]
    assert live.engine.store.updates(2) == []
    # replaying the accepted round-1 envelope verbatim in round 2 is refused too
    assert _refused(live, "site-a", signed_a, payload_a).code() == SC.FAILED_PRECONDITION


def test_unenrolled_certificate_of_the_same_ca_is_refused(live: LiveCoordinator, tmp_path: Path) -> None:
    # Prepare: a certificate the CA signed but the registry never listed (e.g. issued outside enroll-site)
    ca = CertificateAuthority.load(live.ca_dir / "ca.pem", live.ca_dir / "ca.key")
    signing = Ed25519PrivateKey.generate()
    cert, key = ca.issue("rogue", "site", signing_key=signing.public_key(), region="EU-DE")
    (tmp_path / "rogue.pem").write_bytes(cert)
    (tmp_path / "rogue.key").write_bytes(key)
    stub = live.stub(tmp_path / "rogue.pem", tmp_path / "rogue.key")

    # Execute / Assert
    with pytest.raises(grpc.RpcError) as e:
        stub.Join(pb.JoinRequest(agent_version="x"), timeout=10)
    assert e.value.code() == SC.PERMISSION_DENIED and "enrolment registry" in (e.value.details() or "")
    # a second certificate under an enrolled name is refused as well (the registry pins the fingerprint)
    cert2, key2 = ca.issue("site-a", "site", signing_key=signing.public_key())
    (tmp_path / "a2.pem").write_bytes(cert2)
    (tmp_path / "a2.key").write_bytes(key2)
    with pytest.raises(grpc.RpcError) as e:
        live.stub(tmp_path / "a2.pem", tmp_path / "a2.key").Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == SC.PERMISSION_DENIED
    assert any(r["event"] == "join_refused" and r["fields"]["site"] == "rogue" for r in live.audit_records())


def test_join_learns_region_from_the_certificate(live: LiveCoordinator) -> None:
    resp = live.site_stub("site-b").Join(pb.JoinRequest(agent_version="t"), timeout=10)
    assert resp.site == "site-b"
    assert live.engine.store.site_regions() == {"site-b": "EU-FR"}
    joined = [r for r in live.audit_records() if r["event"] == "site_joined"]
    assert joined[-1]["fields"]["region"] == "EU-FR"


def test_revoke_site_refuses_the_next_call_and_is_durable(live: LiveCoordinator) -> None:
    stub = live.site_stub("site-a")
    stub.Join(pb.JoinRequest(agent_version="t"), timeout=10)

    live.call(lambda: live.engine.revoke_site("site-a", "key leaked", "admin"))

    for call in (lambda: stub.Join(pb.JoinRequest(), timeout=10),
                 lambda: stub.FetchTask(pb.FetchTaskRequest(wait_ms=0), timeout=10),
                 lambda: list(stub.DownloadAdapter(pb.DownloadAdapterRequest(round=1), timeout=10))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == SC.PERMISSION_DENIED
    signed, payload = live.update("site-a")
    assert _refused(live, "site-a", signed, payload).code() == SC.PERMISSION_DENIED
    _assert_untouched(live)
    assert live.engine.store.revocations()[0]["name"] == "site-a"
    rec = [r for r in live.audit_records() if r["event"] == "site_revoked"]
    assert rec and rec[0]["fields"] == {"site": "site-a", "reason": "key leaked", "actor": "admin"}
    # site-b is unaffected
    live.site_stub("site-b").Join(pb.JoinRequest(agent_version="t"), timeout=10)


def _stalled_upload(live: LiveCoordinator, site: str, release: threading.Event
                    ) -> tuple[threading.Thread, dict]:
    """Start an upload that sends its first chunk, then stalls until ``release`` (or forever)."""
    signed, payload = live.update(site)
    result: dict = {}

    def messages() -> Iterator[pb.UploadUpdateRequest]:
        msgs = list(upload_messages(signed, payload, chunk=64))
        yield msgs[0]
        result["first_sent"] = time.monotonic()
        release.wait(30)
        yield from msgs[1:]

    def run() -> None:
        try:
            result["resp"] = live.site_stub(site).UploadUpdate(messages(), timeout=30)
        except grpc.RpcError as e:
            result["code"], result["t"] = e.code(), time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while "first_sent" not in result and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the first chunk reached the engine
    return t, result


def test_revocation_cuts_off_an_open_upload_stream(live: LiveCoordinator) -> None:
    # Prepare: an upload in progress, stalled mid-stream
    release = threading.Event()
    t, result = _stalled_upload(live, "site-a", release)

    # Execute
    revoked_at = time.monotonic()
    live.call(lambda: live.engine.revoke_site("site-a", "compromised", "admin"))
    t.join(10)
    release.set()

    # Assert: cut off at once with PERMISSION_DENIED, nothing stored
    assert result.get("code") == SC.PERMISSION_DENIED, result
    assert result["t"] - revoked_at < 2.0
    _assert_untouched(live)


def test_revocation_ends_a_long_poll(live: LiveCoordinator) -> None:
    stub = live.site_stub("site-a")
    signed, payload = live.update("site-a")
    assert _upload(live, "site-a", signed, payload).accepted  # now site-a has nothing to do: FetchTask waits
    result: dict = {}

    def poll() -> None:
        try:
            result["resp"] = stub.FetchTask(pb.FetchTaskRequest(wait_ms=15_000), timeout=30)
        except grpc.RpcError as e:
            result["code"], result["t"] = e.code(), time.monotonic()

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    revoked_at = time.monotonic()
    live.call(lambda: live.engine.revoke_site("site-a", "left the consortium", "admin"))
    t.join(10)
    assert result.get("code") == SC.PERMISSION_DENIED, result
    assert result["t"] - revoked_at < 2.0


def test_crl_written_by_revoke_site_cuts_off_an_open_stream(live: LiveCoordinator) -> None:
    """``fedbridge-admin revoke-site`` (CRL + registry on disk) works without any admin API call."""
    release = threading.Event()
    t, result = _stalled_upload(live, "site-b", release)

    revoked_at = time.monotonic()
    entry = revoke_site(live.fed, "site-b", "audit finding")
    t.join(10)
    release.set()

    assert result.get("code") == SC.PERMISSION_DENIED, result
    assert result["t"] - revoked_at < 3.0  # the coordinator polls the files every 0.5 s
    assert entry.serial in live.engine.gate.access.revoked_serials  # type: ignore[union-attr]
    assert [r["name"] for r in live.engine.store.revocations()] == ["site-b"]
    with pytest.raises(grpc.RpcError) as e:
        live.site_stub("site-b").Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == SC.PERMISSION_DENIED
    _assert_untouched(live)


def test_a_crl_not_signed_by_the_federation_ca_refuses_every_site(live: LiveCoordinator, tmp_path: Path) -> None:
    """A swapped CRL must not silently un-revoke anyone: the coordinator refuses site calls until it is fixed."""
    from coordinator.trust.pki import write_crl

    write_crl(CertificateAuthority.create("impostor"), {}, live.fed / "crl.pem")
    with pytest.raises(grpc.RpcError) as e:
        live.site_stub("site-a").Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == SC.PERMISSION_DENIED and "CRL" in (e.value.details() or "")
