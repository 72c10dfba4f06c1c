"""Hostile SecAgg participants against a real coordinator over mutual TLS (issue #13).

The attacker speaks only the published protocol: messages and stubs come from the ``wire`` fixture (protoc on the
.proto files, a private descriptor pool), keys and signatures from ``cryptography``, payloads from ``safetensors``.
Project code only sets the federation up (``LiveCoordinator``), reads results (store, audit log), and, in one case,
plays the honest site agents (``site_agent.egress.secagg.secure_upload``) that the attacker feeds junk.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from coordinator.config import SecureAggregationSpec
from tests.coordinator.live_coordinator import FED, LiveCoordinator

REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
METHODS = ("GetSettings", "AdvertiseKeys", "GetRoster", "ShareKeys", "GetShares", "GetUnmaskRequest",
           "SignSurvivors", "GetSurvivorSignatures", "UnmaskShares")


def _spec(**over: Any) -> SecureAggregationSpec:
    return SecureAggregationSpec(**{"enabled": True, "threshold": 2, "clip_range": 64.0, "bits": 20, **over})


def _channel(lc: LiveCoordinator, site: str) -> grpc.Channel:
    kit = lc.kits[site]
    creds = grpc.ssl_channel_credentials(root_certificates=(lc.fed / "ca.pem").read_bytes(),
                                         private_key=(kit / "client.key").read_bytes(),
                                         certificate_chain=(kit / "client.pem").read_bytes())
    ch = grpc.secure_channel(f"127.0.0.1:{lc.port}", creds)
    lc._channels.append(ch)
    return ch


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()  # type: ignore[no-any-return]


def _keys(wire: Any, site: str, key: Ed25519PrivateKey, attempt: int = 0, named: str | None = None) -> Any:
    """Two fresh X25519 public keys in a SecAggKeys naming ``named`` (default ``site``), signed with ``key``."""
    def raw() -> bytes:
        return X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = wire.msg["SecAggKeys"](federation_id=FED, round=1, site=named or site, cipher_public_key=raw(),
                                  mask_public_key=raw(), attempt=attempt).SerializeToString()
    return wire.msg["SignedSecAggKeys"](keys=body, signature=key.sign(body))


def _audit(lc: LiveCoordinator, event: str) -> list[dict[str, Any]]:
    return [r["fields"] for r in lc.audit_records() if r["event"] == event]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCoordinator]:
    """One federation for the cheap refusals: site-r is revoked."""
    lc = LiveCoordinator(tmp_path_factory.mktemp("secagg-hostile"), sites=("site-a", "site-b", "site-r"),
                         secure_aggregation=_spec(stage_timeout_s=30))
    lc.call(lambda: lc.engine.revoke_site("site-r", "hostile test", "admin"))
    yield lc
    lc.close()


def test_a_revoked_site_is_refused_permission_denied_on_every_secagg_rpc(fed: LiveCoordinator, wire: Any) -> None:
    # Prepare: site-r was enrolled, then revoked; its certificate is still CA-signed and unexpired
    stub = wire.stub(_channel(fed, "site-r"), "SecAggService")
    assert set(METHODS) == {m.name for m in wire.services["SecAggService"].methods}
    body = {"AdvertiseKeys": {"keys": _keys(wire, "site-r", fed.signing_key("site-r"))}}
    for m in METHODS:
        req = wire.msg[f"{m}Request"](**({"round": 1} if m != "GetSettings" else {}), **body.get(m, {}))
        # Execute / Assert: refused by the access gate, never UNKNOWN / INTERNAL
        assert _code(lambda m=m, req=req: getattr(stub, m)(req, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED, m
    assert "site-r" not in [k[0] for k in fed.engine.store.secagg_keys(1)]


def test_keys_naming_another_site_are_refused(fed: LiveCoordinator, wire: Any) -> None:
    # Prepare: site-a signs keys that name site-b, and sends keys naming itself signed with a key not its own
    stub = wire.stub(_channel(fed, "site-a"), "SecAggService")
    req = wire.msg["AdvertiseKeysRequest"]
    as_b = _keys(wire, "site-a", fed.signing_key("site-a"), named="site-b")
    stolen = _keys(wire, "site-a", fed.signing_key("site-b"))
    # Execute / Assert
    assert _code(lambda: stub.AdvertiseKeys(req(round=1, keys=as_b), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stub.AdvertiseKeys(req(round=1, keys=stolen), timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert [k[0] for k in fed.engine.store.secagg_keys(1)] == []


def test_garbage_bodies_get_a_specific_refusal_and_the_coordinator_stays_up(fed: LiveCoordinator, wire: Any) -> None:
    ch = _channel(fed, "site-b")
    svc = wire.services["SecAggService"].full_name
    junk = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", os.urandom(300), b"\x12\x05ab"]  # bad tag, long length
    for m in METHODS:
        raw = ch.unary_unary(f"/{svc}/{m}", request_serializer=None, response_deserializer=None)
        for body in junk:
            try:
                raw(body, timeout=10)
            except grpc.RpcError as e:
                # Assert: a specific refusal, never UNKNOWN / INTERNAL
                assert e.code() in REFUSED, (m, body[:8], e.code(), e.details())
    # well-formed messages full of junk values
    stub = wire.stub(ch, "SecAggService")
    msg = wire.msg
    bad_keys = msg["SignedSecAggKeys"](keys=b"\x00" * 40, signature=b"\x01" * 64)
    cases = {
        "AdvertiseKeys": msg["AdvertiseKeysRequest"](round=1, keys=bad_keys),
        "AdvertiseKeys-far-round": msg["AdvertiseKeysRequest"](round=2**63, keys=bad_keys),
        "ShareKeys": msg["ShareKeysRequest"](round=1, shares=[msg["EncryptedShare"](site="../" * 50, ciphertext=b"x" * 5000)]),
        "SignSurvivors": msg["SignSurvivorsRequest"](round=1, attempt=2**32 - 1, signature=b"\x00" * 3),
        "UnmaskShares": msg["UnmaskSharesRequest"](round=1, undecryptable=["site-a"] * 1000),
        "GetRoster": msg["GetRosterRequest"](round=2**64 - 1, wait_ms=2**32 - 1),
    }
    for name, req in cases.items():
        method = name.split("-")[0]
        t0 = time.monotonic()
        try:
            getattr(stub, method)(req, timeout=10)
        except grpc.RpcError as e:
            assert e.code() in REFUSED, (name, e.code(), e.details())
        assert time.monotonic() - t0 < 9, name  # a huge wait_ms on a round that is not running does not hang
    # Assert: alive and serving
    assert stub.GetSettings(msg["GetSettingsRequest"](), timeout=10).enabled
    assert not fed.engine.failed.is_set()


def _masked_upload(wire: Any, lc: LiveCoordinator, ch: grpc.Channel, site: str, task: Any, length: int) -> Any:
    """A masked input of the right shape (its values are junk), in a correctly signed envelope, built by hand."""
    from safetensors.numpy import save

    payload = save({"secagg.masked": np.frombuffer(os.urandom(8 * length), dtype=np.int64).copy()})
    env = wire.msg["UpdateEnvelope"](
        federation_id=FED, round=1, site=site, base_model_sha256=task.base_model_sha256,
        payload_sha256=hashlib.sha256(payload).hexdigest(), payload_size=len(payload), nonce=os.urandom(16),
        payload_kind=1, adapter_spec_sha256=task.adapter_spec.sha256, num_examples=1,
        created_unix_ms=int(time.time() * 1000)).SerializeToString(deterministic=True)
    signed = wire.msg["SignedEnvelope"](envelope=env, signature=lc.signing_key(site).sign(env))
    first = wire.msg["UploadUpdateRequest"](envelope=signed, offset=0, data=payload)
    return wire.stub(ch, "FederationService").UploadUpdate(iter([first]), timeout=30)


def test_a_masked_stage_below_threshold_is_abandoned_in_time_and_stale_attempt_messages_are_refused(
        tmp_path: Path, wire: Any) -> None:
    # Prepare: four sites join; a, b and c make the roster (d never advertises), all three share keys, and only
    # site-a sends its masked input: 1 of the 2 the threshold needs
    timeout = 1.5
    lc = LiveCoordinator(tmp_path, sites=("site-a", "site-b", "site-c", "site-d"),
                         secure_aggregation=_spec(stage_timeout_s=timeout))
    try:
        m = wire.msg
        chans = {s: _channel(lc, s) for s in lc.kits}
        sec = {s: wire.stub(ch, "SecAggService") for s, ch in chans.items()}
        for ch in chans.values():
            wire.stub(ch, "FederationService").Join(m["JoinRequest"](agent_version="hostile", modes=["sft"]), timeout=10)
        task = wire.stub(chans["site-a"], "FederationService").FetchTask(m["FetchTaskRequest"](wait_ms=0),
                                                                          timeout=10).task
        keys0 = {s: _keys(wire, s, lc.signing_key(s)) for s in ("site-a", "site-b", "site-c")}
        for s, k in keys0.items():
            sec[s].AdvertiseKeys(m["AdvertiseKeysRequest"](round=1, keys=k), timeout=10)
        roster = sec["site-a"].GetRoster(m["GetRosterRequest"](round=1, wait_ms=int(timeout * 1000) + 3000), timeout=15)
        assert roster.status == wire.enums["SecAggStatus"].values_by_name["SECAGG_STATUS_READY"].number
        assert sorted(e.site for e in roster.entries) == ["site-a", "site-b", "site-c"]
        for s in keys0:
            sec[s].ShareKeys(m["ShareKeysRequest"](round=1, shares=[
                m["EncryptedShare"](site=o, ciphertext=os.urandom(100)) for o in keys0 if o != s]), timeout=10)
        t0 = time.monotonic()
        assert _masked_upload(wire, lc, chans["site-a"], "site-a", task, roster.params.vector_length).accepted
        # Execute: wait for the masked stage's deadline
        now = sec["site-a"].GetRoster(m["GetRosterRequest"](round=1, wait_ms=0), timeout=10)
        while now.attempt == 0 and time.monotonic() - t0 < timeout + 5:
            time.sleep(0.1)
            now = sec["site-a"].GetRoster(m["GetRosterRequest"](round=1, wait_ms=0), timeout=10)
        elapsed = time.monotonic() - t0
        # Assert: abandoned within its deadline (plus the ticker's period), retried as attempt 1 without b and c
        assert now.attempt == 1 and elapsed < timeout + 1.5, elapsed
        (abandoned,) = _audit(lc, "secagg_attempt_abandoned")
        assert abandoned["stage"] == "masked" and abandoned["missing"] == ["site-b", "site-c"]
        assert not lc.engine.failed.is_set() and lc.engine.store.current_round().state == "open"  # type: ignore[union-attr]
        # stale-attempt messages are refused: attempt-0 keys, a signature for attempt 0
        fp = grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: sec["site-a"].AdvertiseKeys(m["AdvertiseKeysRequest"](round=1, keys=keys0["site-a"]),
                                                         timeout=10)) == fp
        assert _code(lambda: sec["site-a"].SignSurvivors(m["SignSurvivorsRequest"](
            round=1, attempt=0, signature=os.urandom(64)), timeout=10)) == fp
        # the sites left out of attempt 1 cannot come back into it; site-a can
        assert _code(lambda: sec["site-b"].AdvertiseKeys(m["AdvertiseKeysRequest"](
            round=1, keys=_keys(wire, "site-b", lc.signing_key("site-b"), attempt=1)), timeout=10)) == fp
        sec["site-a"].AdvertiseKeys(m["AdvertiseKeysRequest"](
            round=1, keys=_keys(wire, "site-a", lc.signing_key("site-a"), attempt=1)), timeout=10)
        assert [k[0] for k in lc.engine.store.secagg_keys(1)] == ["site-a"]
    finally:
        lc.close()


@pytest.mark.parametrize("dealer", ["junk", "other_key"])
def test_a_dealer_of_bad_shares_is_dropped_and_named_the_honest_agents_survive_and_a_restart_comes_up(
        tmp_path: Path, wire: Any, dealer: str) -> None:
    # Prepare: honest site agents a and b (the project's site code) and an attacker x that advertises valid signed
    # keys, then deals junk ciphertexts instead of encrypted shares ("junk"), or well-encrypted Shamir shares of a
    # mask key other than the one it advertised ("other_key"; the site code serves as its crypto toolkit, every
    # message goes through the wire client), and sends no masked input
    from site_agent.client import CoordinatorClient
    from site_agent.egress.secagg import secure_upload
    from tests.coordinator.live_coordinator import delta

    lc = LiveCoordinator(tmp_path, sites=("site-a", "site-b", "site-x"), secure_aggregation=_spec(stage_timeout_s=2.0))
    try:
        m = wire.msg
        results: dict[str, Any] = {}

        def honest(site: str) -> None:
            kit = lc.kits[site]
            cfg = SimpleNamespace(tls=SimpleNamespace(ca=lc.fed / "ca.pem", cert=kit / "client.pem",
                                                      key=kit / "client.key"),
                                  server_name="", coordinator=f"127.0.0.1:{lc.port}", retry_for_s=10.0)
            client = CoordinatorClient(cfg)  # type: ignore[arg-type]
            try:
                client.join("honest")
                task = client.fetch_task(0).task
                results[site] = secure_upload(client, task, site, lc.signing_key(site), (lc.fed / "ca.pem").read_bytes(),
                                              delta(), 10)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                results[site] = e
            finally:
                client.close()

        ch = _channel(lc, "site-x")
        wire.stub(ch, "FederationService").Join(m["JoinRequest"](agent_version="evil", modes=["sft"]), timeout=10)
        x = wire.stub(ch, "SecAggService")
        kit = None
        if dealer == "junk":
            signed_keys = _keys(wire, "site-x", lc.signing_key("site-x"))
        else:
            from fedcommon import secagg as sa
            from site_agent.egress.secagg import SiteSecAgg

            kit = SiteSecAgg(FED, 1, "site-x", lc.signing_key("site-x"), (lc.fed / "ca.pem").read_bytes())
            signed_keys = m["SignedSecAggKeys"].FromString(kit.advertise().SerializeToString())
            advertised = kit._keys()
            kit.mask_key = sa.private_bytes(sa.new_private_key())  # the shares it deals are of another key
            kit._keys = lambda: advertised  # type: ignore[method-assign]
        x.AdvertiseKeys(m["AdvertiseKeysRequest"](round=1, keys=signed_keys), timeout=10)
        threads = [threading.Thread(target=honest, args=(s,)) for s in ("site-a", "site-b")]
        for t in threads:
            t.start()
        roster = x.GetRoster(m["GetRosterRequest"](round=1, wait_ms=15_000), timeout=20)
        assert sorted(e.site for e in roster.entries) == ["site-a", "site-b", "site-x"]
        # Execute: junk "shares" of the right size range for both honest sites, or shares of the other key
        if kit is None:
            shares = [m["EncryptedShare"](site=s, ciphertext=os.urandom(120)) for s in ("site-a", "site-b")]
        else:
            from protos.fedbridge.v1 import secagg_service_pb2 as spb  # the toolkit's types, converted as bytes

            made = kit.share([spb.RosterEntry.FromString(e.SerializeToString()) for e in roster.entries],
                             spb.SecAggParams.FromString(roster.params.SerializeToString()), roster.params.vector_length)
            shares = [m["EncryptedShare"].FromString(e.SerializeToString()) for e in made]
        x.ShareKeys(m["ShareKeysRequest"](round=1, shares=shares), timeout=10)
        for t in threads:
            t.join(40)
        # Assert: the honest agents finished their part (masked input sent, shares revealed), no exception
        assert all(not t.is_alive() for t in threads)
        for s in ("site-a", "site-b"):
            assert not isinstance(results[s], BaseException), (s, results[s])
            assert results[s] is not None, s
        # both named the dealer; it was dropped and named; the round goes on as attempt 1 without it
        assert sorted((u["site"], tuple(u["dealers"])) for u in _audit(lc, "secagg_share_undecryptable")) == (
            [("site-a", ("site-x",)), ("site-b", ("site-x",))] if dealer == "junk" else [])
        assert [d["site"] for d in _audit(lc, "secagg_participant_dropped")] == ["site-x"]
        st = lc.engine.store.secagg_round(1)
        assert st is not None and st["members"]["attempt"] == 1 and st["members"]["excluded"] == ["site-x"]
        assert not lc.engine.failed.is_set() and lc.engine.store.current_round().state == "open"  # type: ignore[union-attr]
        excluded = wire.enums["SecAggStatus"].values_by_name["SECAGG_STATUS_EXCLUDED"].number
        assert x.GetRoster(m["GetRosterRequest"](round=1, wait_ms=0), timeout=10).status == excluded
        # a restart of the coordinator on that state comes up and stays up
        lc.restart()
        time.sleep(1.0)
        assert not lc.engine.failed.is_set(), repr(lc.engine.fatal)
        stub = wire.stub(_channel(lc, "site-a"), "SecAggService")
        assert stub.GetRoster(m["GetRosterRequest"](round=1, wait_ms=0), timeout=10).attempt == 1
    finally:
        lc.close()
