"""Upload faults against a real coordinator (in-process, real TLS) and the project's own site client: a corrupted
chunk, and the same signed update uploaded twice (one after the other, and two streams at once). No federation is
trained, so these run in the default run in seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from tests.coordinator.live_coordinator import LiveCoordinator, delta

CHUNK = 64  # bytes per upload message, so an update is several chunks


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    """One coordinator for the module; each test uses a site of its own (so round 1 stays open until all three
    sites have an update in, whatever the order)."""
    c = LiveCoordinator(tmp_path_factory.mktemp("upload-faults"), sites=("site-a", "site-b", "site-c", "site-d"), min_sites=4)
    yield c
    c.close()


def _client(lc: LiveCoordinator, site: str) -> Any:
    from site_agent.client import CoordinatorClient

    kit = lc.kits[site]
    cfg = SimpleNamespace(tls=SimpleNamespace(ca=lc.fed / "ca.pem", cert=kit / "client.pem", key=kit / "client.key"),
                          server_name="", coordinator=f"127.0.0.1:{lc.port}", retry_for_s=20.0)
    return CoordinatorClient(cfg, chunk_size=CHUNK)  # type: ignore[arg-type]


def _events(lc: LiveCoordinator, event: str, site: str) -> list[dict[str, Any]]:
    return [r["fields"] for r in lc.audit_records() if r["event"] == event and r["fields"]["site"] == site]


def _assert_stored_once(lc: LiveCoordinator, site: str, payload: bytes) -> None:
    (row,) = [u for u in lc.engine.store.updates(1) if u.site == site]
    assert row.payload_sha256 == codec.sha256_hex(payload) == codec.sha256_hex(row.path.read_bytes())
    assert [e["payload_sha256"] for e in _events(lc, "update_accepted", site)] == [row.payload_sha256]


def test_corrupted_chunk_is_refused_with_data_loss_and_the_site_sends_the_update_again(live: LiveCoordinator) -> None:
    # Prepare: site-a's client flips one byte of its second chunk on the first attempt only (the bytes no longer
    # match the signed SHA-256; TLS cannot see it: the corruption lies above the transport)
    signed, payload = live.update("site-a", delta(0.1, 0.2))
    env = pb.UpdateEnvelope.FromString(signed.envelope)
    client = _client(live, "site-a")
    original = client._upload_messages
    attempts: list[int] = []

    def corrupting(signed: pb.SignedEnvelope, payload: bytes, offset: int, on_progress: Any) -> Iterator[Any]:
        attempts.append(offset)
        for msg in original(signed, payload, offset, on_progress):
            if len(attempts) == 1 and msg.offset == CHUNK:
                data = bytearray(msg.data)
                data[7] ^= 0x01
                msg = pb.UploadUpdateRequest(envelope=msg.envelope, offset=msg.offset, data=bytes(data))
            yield msg

    client._upload_messages = corrupting
    try:
        # Execute
        resp = client.upload(signed, env, payload)
    finally:
        client.close()

    # Assert: refused once with DATA_LOSS (audited, the bad bytes discarded), sent again from 0, accepted once
    assert len(payload) > 2 * CHUNK
    assert resp.accepted and resp.committed_offset == len(payload)
    assert attempts == [0, 0]
    assert [e["status"] for e in _events(live, "update_refused", "site-a")] == ["DATA_LOSS"]
    _assert_stored_once(live, "site-a", payload)
    assert not live.engine.store.partials_of("site-a")


def test_the_same_signed_update_uploaded_twice_is_counted_once(live: LiveCoordinator) -> None:
    # Prepare
    signed, payload = live.update("site-c", delta(0.3, 0.1))
    env = pb.UpdateEnvelope.FromString(signed.envelope)
    client = _client(live, "site-c")
    try:
        # Execute: upload it, then upload the very same signed envelope and bytes again
        first = client.upload(signed, env, payload)
        again = client.upload(signed, env, payload)
    finally:
        client.close()

    # Assert: the second is an idempotent ack of the first (no new row, no second update_accepted, no refusal)
    assert first.accepted and again.accepted and again.committed_offset == len(payload)
    _assert_stored_once(live, "site-c", payload)
    assert _events(live, "update_refused", "site-c") == []


def test_two_concurrent_uploads_of_one_signed_update_are_counted_once(live: LiveCoordinator) -> None:
    # Prepare: two clients of site-b (as a site restarted while its old process still streams) hold the same update
    signed, payload = live.update("site-b", delta(0.2, 0.2))
    env = pb.UpdateEnvelope.FromString(signed.envelope)
    clients = [_client(live, "site-b") for _ in range(2)]
    results: list[Any] = [None, None]
    go = threading.Barrier(2)
    slow = clients[0]._upload_messages

    def slowly(*args: Any) -> Iterator[Any]:  # the first client's stream lasts long enough that the two overlap
        for msg in slow(*args):
            time.sleep(0.02)
            yield msg

    clients[0]._upload_messages = slowly

    def send(i: int) -> None:
        go.wait()
        try:
            results[i] = clients[i].upload(signed, env, payload)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[i] = e

    # Execute: both streams at once
    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()

    # Assert: both end accepted (one stored it, the other was told busy and retried, or was acked as the same
    # update), one row, one update_accepted
    refused = _events(live, "update_refused", "site-b")
    assert all(getattr(r, "accepted", False) for r in results), (results, refused)
    _assert_stored_once(live, "site-b", payload)
    assert {e["status"] for e in refused} <= {"ABORTED"}, refused


@pytest.mark.parametrize(("value", "ok"), [(0, True), (4096, True), (4 << 20, True), (-1, False), ((4 << 20) + 1, False)])
def test_upload_chunk_bytes_is_checked_naming_the_field(tmp_path: Path, value: int, ok: bool) -> None:
    from site_agent.config import SiteConfig, SiteData, SiteTls

    tls = SiteTls(ca=tmp_path / "ca", cert=tmp_path / "c", key=tmp_path / "k", signing_key=tmp_path / "s")

    def make() -> SiteConfig:
        return SiteConfig(name="s", coordinator="localhost:1", base_model=tmp_path, tls=tls,
                          data=SiteData(train=tmp_path / "t.jsonl"), work_dir=tmp_path, upload_chunk_bytes=value)

    if ok:
        assert make().upload_chunk_bytes == value
    else:
        with pytest.raises(ValueError, match=f"field 'upload_chunk_bytes': must be in 0..{4 << 20} .* got {value}"):
            make()
