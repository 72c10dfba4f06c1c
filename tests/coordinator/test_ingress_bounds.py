"""Ingress bounds of issue #13: one accepted update per (round, site) decided atomically, stored bytes checked before
aggregation, per-site caps on partial uploads and their cleanup, site names that become paths, the signed
``created_unix_ms`` window, and ``rounds`` after a SecAgg round."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from live_coordinator import LiveCoordinator, delta, upload_messages

from coordinator.admin import views
from coordinator.config import FederationConfig, TlsSpec
from coordinator.errors import CoordinatorError, DuplicateUpdate
from coordinator.ingress.uploads import Chunk
from coordinator.rounds.store import Store
from coordinator.trust.pki import CertificateAuthority
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

SC = grpc.StatusCode


@pytest.fixture()
def live(tmp_path: Path) -> Iterator[LiveCoordinator]:
    c = LiveCoordinator(tmp_path, sites=("site-a", "site-b", "site-c"), max_update_bytes=4096, min_sites=3,
                        max_partial_bytes_per_site=3 * 4096, max_partial_uploads_per_site=10)
    yield c
    c.close()


def test_concurrent_streams_of_one_site_accept_one_update_and_never_overwrite_it(live: LiveCoordinator) -> None:
    # Prepare: two validly signed, different updates of site-a for round 1, both streams begun before either ends
    (sa, pa), (sb, pb_) = live.update("site-a", delta(0.1, 0.1)), live.update("site-a", delta(0.2, 0.3))
    from coordinator.trust.pki import cert_identity

    ident = cert_identity(live.kits["site-a"] / "client.pem")
    both_begun = asyncio.Event()
    begun = 0

    async def stream(signed: pb.SignedEnvelope, payload: bytes) -> AsyncIterator[Chunk]:
        nonlocal begun
        half = len(payload) // 2
        yield Chunk(signed, 0, payload[:half])
        begun += 1
        if begun == 2:
            both_begun.set()
        await both_begun.wait()
        yield Chunk(None, half, payload[half:])

    async def both() -> list[object]:
        ing = live.engine.ingress
        return await asyncio.gather(ing.receive_upload(ident, stream(sa, pa)), ing.receive_upload(ident, stream(sb, pb_)),
                                    return_exceptions=True)

    # Execute
    first, second = live.run(both())

    # Assert: exactly one accepted, the other refused ALREADY_EXISTS (audited); the stored file is the winner's bytes
    results = {"a": first, "b": second}
    won = [k for k, r in results.items() if getattr(r, "accepted", False)]
    lost = [r for r in results.values() if not getattr(r, "accepted", False)]
    assert len(won) == 1, results
    assert isinstance(lost[0], DuplicateUpdate) and isinstance(lost[0], CoordinatorError), repr(lost[0])
    (row,) = live.engine.store.updates(1)
    assert row.payload_sha256 == codec.sha256_hex(pa if won == ["a"] else pb_)
    assert codec.sha256_hex(row.path.read_bytes()) == row.payload_sha256
    refused = [r for r in live.audit_records() if r["event"] == "update_refused"]
    assert [r["fields"]["status"] for r in refused] == ["ALREADY_EXISTS"]
    assert not list((live.engine.store.uploads / "staging").glob("*"))


def test_aggregation_refuses_a_stored_update_that_no_longer_matches_its_hash(live: LiveCoordinator) -> None:
    # Prepare: site-a's accepted update, then its file replaced behind the store's back
    signed, payload = live.update("site-a")
    assert live.site_stub("site-a").UploadUpdate(upload_messages(signed, payload), timeout=20).accepted
    (row,) = live.engine.store.updates(1)
    other = live.update("site-a", delta(0.9, 0.9))[1]
    row.path.write_bytes(other)

    # Execute / Assert
    from coordinator.rounds.steps import StoredUpdateMismatch

    with pytest.raises(StoredUpdateMismatch, match="site 'site-a'.*refusing to aggregate"):
        live.engine.steps.aggregate(1, [row])
    assert not live.engine.store.adapter_path(2).exists()


def test_partial_upload_bytes_are_capped_per_site(live: LiveCoordinator) -> None:
    # Prepare: unfinished uploads of 4000 bytes each, each declaring max_update_bytes (4096)
    stub = live.site_stub("site-a")

    def start(i: int) -> pb.UploadUpdateResponse:
        signed, _ = live.update("site-a", payload_size=4096, payload_sha256=f"{i:064x}")
        return stub.UploadUpdate(iter([pb.UploadUpdateRequest(envelope=signed, offset=0, data=b"z" * 4000)]),
                                 timeout=20)

    # Execute / Assert: three fit the 3 x 4096 cap; a fourth (12000 held + 4096 declared) does not
    for i in range(1, 4):
        assert start(i).accepted is False
    with pytest.raises(grpc.RpcError) as e:
        start(4)
    assert e.value.code() == SC.RESOURCE_EXHAUSTED and "max_partial_bytes_per_site" in e.value.details()
    # Another site is not affected.
    signed, payload = live.update("site-b")
    assert live.site_stub("site-b").UploadUpdate(upload_messages(signed, payload), timeout=20).accepted


def test_partials_are_removed_when_their_round_closes_and_at_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.open_round(1, "0" * 64)
    p1 = store.partial_path(1, "site-a", "a" * 64)
    p1.parent.mkdir(parents=True)
    p1.write_bytes(b"x" * 10)
    store.close_round(1, "1" * 64, {})
    assert not p1.exists()
    # A partial of a closed round left by a crash (and a staging file) is gone after a restart.
    store.open_round(2, "1" * 64)
    late = store.partial_path(1, "site-a", "b" * 64)
    keep = store.partial_path(2, "site-a", "c" * 64)
    for p in (late, keep, store.uploads / "staging" / "x.safetensors"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"y")
    store.close()
    store = Store(tmp_path / "state")
    assert late.exists()  # opening the store (e.g. an admin command while the coordinator runs) removes nothing
    store.sweep_uploads()  # the coordinator's start
    assert not late.exists() and not (store.uploads / "staging" / "x.safetensors").exists()
    assert keep.exists()  # round 2 is open: its partials resume
    store.close()


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "site-a\n", "x" * 65])
def test_site_names_that_are_not_file_names_never_become_paths(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path / "state")
    with pytest.raises(ValueError, match="not a valid site name"):
        store.partial_path(1, name, "a" * 64)
    with pytest.raises(ValueError, match="not a valid site name"):
        store.update_path(1, name)
    store.close()


def test_a_ca_signed_certificate_whose_cn_is_no_site_name_is_refused(tmp_path: Path) -> None:
    # Prepare: no enrolment registry (any CA-signed site certificate may act); CNs a CA may well sign but that are
    # no file name of a site ("*" globs every site's files, ".." and a space are no names)
    live = LiveCoordinator(tmp_path, enrolment_registry=None, crl=None)
    try:
        ca = CertificateAuthority.load(live.ca_dir / "ca.pem", live.ca_dir / "ca.key")
        for i, cn in enumerate(("*", "..", "site a")):
            signing = Ed25519PrivateKey.generate()
            cert, key = ca.issue(cn, "site", signing_key=signing.public_key(), region="EU-DE")
            (tmp_path / f"evil{i}.pem").write_bytes(cert)
            (tmp_path / f"evil{i}.key").write_bytes(key)
            stub = live.stub(tmp_path / f"evil{i}.pem", tmp_path / f"evil{i}.key")
            signed, payload = live.update(cn, key=signing, payload_size=4096)

            # Execute / Assert
            with pytest.raises(grpc.RpcError) as e:
                stub.UploadUpdate(upload_messages(signed, payload), timeout=20)
            assert e.value.code() == SC.PERMISSION_DENIED and "not a valid site name" in e.value.details(), cn
        assert not list(live.engine.store.uploads.rglob("*.part"))
    finally:
        live.close()


def test_created_unix_ms_is_checked_against_the_skew_window(live: LiveCoordinator) -> None:
    now = int(time.time() * 1000)
    stub = live.site_stub("site-a")
    for created in (now + 2 * 3600_000, now - 3 * 3600_000, 0):
        signed, payload = live.update("site-a", created_unix_ms=created)
        with pytest.raises(grpc.RpcError) as e:
            stub.UploadUpdate(upload_messages(signed, payload), timeout=20)
        assert e.value.code() == SC.FAILED_PRECONDITION and "created_unix_ms" in e.value.details()
    assert [r["fields"]["status"] for r in live.audit_records() if r["event"] == "update_refused"] == [
        "FAILED_PRECONDITION"] * 3
    # A site whose clock is 59 minutes ahead still gets its update in.
    signed, payload = live.update("site-a", created_unix_ms=now + 59 * 60_000)
    assert stub.UploadUpdate(upload_messages(signed, payload), timeout=20).accepted


def test_replayed_envelope_of_round_1_in_round_2(tmp_path: Path) -> None:
    live = LiveCoordinator(tmp_path, max_update_bytes=4096)  # min_sites 2: round 1 closes with site-a and site-b
    try:
        old = {s: live.update(s) for s in ("site-a", "site-b")}
        for s, (signed, payload) in old.items():
            assert live.site_stub(s).UploadUpdate(upload_messages(signed, payload), timeout=20).accepted
        deadline = time.monotonic() + 30
        while (cur := live.engine.store.current_round()) is None or cur.round != 2 or cur.state != "open":
            assert time.monotonic() < deadline, "round 2 never opened"
            time.sleep(0.1)
        # Round 1's envelope again: round 1 closed (late_policy = drop), never a second update in round 2.
        signed, payload = old["site-a"]
        with pytest.raises(grpc.RpcError) as e:
            live.site_stub("site-a").UploadUpdate(upload_messages(signed, payload), timeout=20)
        assert e.value.code() == SC.FAILED_PRECONDITION
        # Round 1's nonce in an envelope re-made for round 2.
        env = pb.UpdateEnvelope.FromString(signed.envelope)
        env.round = 2
        replay = codec.sign_envelope(env, live.signing_key("site-a"))
        with pytest.raises(grpc.RpcError) as e:
            live.site_stub("site-a").UploadUpdate(upload_messages(replay, payload), timeout=20)
        assert e.value.code() == SC.ALREADY_EXISTS
        assert [u.site for u in live.engine.store.updates(2)] == []
        # And the admin view of the rounds still renders.
        assert [r["round"] for r in views.rounds(live.engine)] == [1, 2]
    finally:
        live.close()


def test_rounds_view_renders_a_closed_secagg_round(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.open_round(1, "0" * 64)
    store.close_round(1, "1" * 64, {"aggregation_error": {"mean": None, "max": None, "per_module": {},
                                                          "note": "not measurable under secure aggregation"}})
    rows = views.rounds(SimpleNamespace(store=store))  # type: ignore[arg-type]
    assert rows[0]["aggregation_error_mean"] == 0.0 and rows[0]["state"] == "closed"
    store.close()


def test_ingress_settings_are_checked(tmp_path: Path) -> None:
    base = dict(federation_id="f", base_model=tmp_path, tls=TlsSpec(tmp_path, tmp_path, tmp_path),
                state_dir=tmp_path, registry_dir=tmp_path)
    with pytest.raises(ValueError, match="field 'max_partial_uploads_per_site'"):
        FederationConfig(**base, max_partial_uploads_per_site=0)
    with pytest.raises(ValueError, match="field 'max_partial_bytes_per_site'"):
        FederationConfig(**base, max_update_bytes=100, max_partial_bytes_per_site=99)
    with pytest.raises(ValueError, match="field 'envelope_clock_skew_s'"):
        FederationConfig(**base, envelope_clock_skew_s=0)
    cfg = FederationConfig(**base)
    assert (cfg.max_partial_uploads_per_site, cfg.max_partial_bytes_per_site, cfg.envelope_clock_skew_s) == (
        4, 1 << 30, 3900.0)
