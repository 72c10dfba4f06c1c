"""Secure aggregation against active misbehaviour (issue #13): revoked sites, a dealer of shares that do not fit its
keys, garbled ciphertexts, and a coordinator that shows survivors different sets (the consistency check)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from coordinator.ingress.secagg_servicer import SecAggServicer
from coordinator.trust.pki import CertificateAuthority
from fedcommon import secagg as sa
from protos.fedbridge.v1 import secagg_service_pb2 as spb
from site_agent.egress.secagg import SecAggError, SiteSecAgg
from tests.coordinator.test_secagg import FED, KIND, SimSite, _engine, _run_to_masked, _spec_tensors, _stop


def _audit(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def test_a_dealer_whose_shares_do_not_fit_its_keys_is_dropped_and_the_round_retried(tmp_path: Path) -> None:
    # Prepare: site-e advertises mask key K1 but deals Shamir shares of another key K2, then drops (old code: the
    # unmasking raised in the aggregation step, the coordinator stopped, and every restart died there again)
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcde")]
    cheat = sites[4].proto
    advertised = cheat._keys()
    cheat.mask_key = sa.private_bytes(sa.new_private_key())
    cheat._keys = lambda: advertised  # type: ignore[method-assign]
    now = [0.0]
    from tests.coordinator.test_secagg import _reveal

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        await _run_to_masked(eng, sites, sites[:4])
        now[0] += 6
        eng.secagg.tick(1)  # site-e is dropped from the masked stage
        await _reveal(eng, sites[:4], now)
        await asyncio.sleep(0.3)
        # Assert: attempt 1 runs without site-e; the coordinator is alive; the round is still open
        st = eng.store.secagg_round(1)
        assert st is not None and st["stage"] == "advertise" and st["members"]["attempt"] == 1
        assert st["members"]["excluded"] == ["site-e"]
        assert eng.fatal is None and not eng.failed.is_set()
        assert eng.store.current_round().state == "open"  # type: ignore[union-attr]
        _stop(eng)
        # a restart resumes at attempt 1 (nothing persisted is poisoned)
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5)
        await eng.start()
        await asyncio.sleep(0.2)
        assert eng.fatal is None and eng.store.secagg_round(1)["members"]["attempt"] == 1  # type: ignore[index]
        _stop(eng)

    asyncio.run(main())
    dropped = [e for e in _audit(tmp_path / "state") if e["event"] == "secagg_participant_dropped"]
    assert [e["fields"]["site"] for e in dropped] == ["site-e"]


def test_a_revoked_site_is_not_waited_for(tmp_path: Path) -> None:
    # Prepare: 4 sites joined, site-d revoked; the other three advertise (old code: the roster waited for site-d
    # until the stage deadline)
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcd")]
    now = [0.0]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=2, stage_timeout_s=60)
        sec = eng.secagg
        assert sec is not None
        sec.clock = lambda: now[0]
        await eng.start()
        for s in sites:
            eng.join(s.peer, "test", 0)
        eng.revoke_site("site-d", "test", "admin")
        # Execute
        for s in sites[:3]:
            signed = s.proto.advertise()
            sec.advertise(s.peer, s.cert_pem, 1, signed.keys, signed.signature)
        # Assert: the roster closed at once, without the revoked site
        st = eng.store.secagg_round(1)
        assert st is not None and st["stage"] == "share" and st["members"]["roster"] == ["site-a", "site-b", "site-c"]
        _stop(eng)

    asyncio.run(main())


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.code: grpc.StatusCode | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self.pem]}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise _Aborted(details)


def test_every_secagg_rpc_refuses_a_revoked_site(tmp_path: Path) -> None:
    # Prepare: site-c is in the federation and then revoked (old code: SecAggService never ran the access gate)
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abc")]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=2)
        await eng.start()
        for s in sites:
            eng.join(s.peer, "test", 0)
        eng.revoke_site("site-c", "test", "admin")
        svc = SecAggServicer(eng)
        calls = {"GetSettings": spb.GetSettingsRequest(), "AdvertiseKeys": spb.AdvertiseKeysRequest(
            round=1, keys=sites[2].proto.advertise()), "GetRoster": spb.GetRosterRequest(round=1),
            "ShareKeys": spb.ShareKeysRequest(round=1), "GetShares": spb.GetSharesRequest(round=1),
            "GetUnmaskRequest": spb.GetUnmaskRequestRequest(round=1),
            "SignSurvivors": spb.SignSurvivorsRequest(round=1), "UnmaskShares": spb.UnmaskSharesRequest(round=1),
            "GetSurvivorSignatures": spb.GetSurvivorSignaturesRequest(round=1)}
        assert set(calls) == set(spb.DESCRIPTOR.services_by_name["SecAggService"].methods_by_name)
        for method, req in calls.items():
            ctx = _Context(sites[2].cert_pem)
            with pytest.raises(_Aborted, match="revoked"):
                await getattr(svc, method)(req, ctx)
            assert ctx.code == grpc.StatusCode.PERMISSION_DENIED, method
        assert eng.store.secagg_keys(1) == []  # the revoked site's keys never reached the roster
        _stop(eng)

    asyncio.run(main())


def test_garbled_ciphertexts_from_a_peer_are_skipped_and_reported(tmp_path: Path) -> None:
    # Prepare: three sites; the shares site-b and site-c receive from site-a are junk (old code: the site's decrypt
    # raised SecAggCryptoError out of the agent)
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcd")]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=2)
        sec = eng.secagg
        assert sec is not None
        await eng.start()
        for s in sites:
            eng.join(s.peer, "test", 0)
        for s in sites:
            signed = s.proto.advertise()
            sec.advertise(s.peer, s.cert_pem, 1, signed.keys, signed.signature)
        for s in sites:
            status, entries, params = sec.roster(s.peer, 1)
            shares = s.proto.share([spb.RosterEntry(site=n, certificate_pem=pem, keys=spb.SignedSecAggKeys(
                keys=k, signature=sig)) for n, pem, k, sig in entries], params, sa.vector_length(_spec_tensors()))
            if s.name == "site-a":
                shares = [spb.EncryptedShare(site=x.site, ciphertext=b"junk" * 20) for x in shares]
            sec.share_keys(s.peer, 1, [(x.site, x.ciphertext) for x in shares])
        b = sites[1]
        _, got = sec.shares_for(b.peer, 1)
        # Execute: the site masks its input with the junk in hand
        masked = b.proto.mask([spb.EncryptedShare(site=f, ciphertext=ct) for f, ct in got], b.delta, _spec_tensors(),
                              10.0)
        # Assert: it carried on, names site-a, still pairs its mask with site-a, and reveals nothing of site-a
        assert masked.shape == (sa.vector_length(_spec_tensors()),)
        assert b.proto.undecryptable == {"site-a"} and b.proto.sharers == {"site-a", "site-c", "site-d"}
        _stop(eng)

    asyncio.run(main())


def test_sites_refuse_to_unmask_when_the_coordinator_shows_different_survivor_sets() -> None:
    # Prepare: three sites finished stage 2; the coordinator tells site-a the survivors are {a, b, c} and site-b
    # and site-c that they are {b, c} (a dropped), and shows site-a the signatures of b and c over {b, c}
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abc")]
    entries = [spb.RosterEntry(site=s.name, certificate_pem=s.cert_pem, keys=s.proto.advertise()) for s in sites]
    params = spb.SecAggParams(threshold=2, clip_range=64.0, bits=20, vector_length=sa.vector_length(_spec_tensors()))
    shares = {s.name: s.proto.share(entries, params, params.vector_length) for s in sites}
    for s in sites:
        s.proto.mask([spb.EncryptedShare(site=o.name, ciphertext=next(x.ciphertext for x in shares[o.name]
                                                                      if x.site == s.name))
                      for o in sites if o is not s], s.delta, _spec_tensors(), 10.0)
    a, b, c = (s.proto for s in sites)
    a_sig = a.sign_survivors(["site-a", "site-b", "site-c"], [], 0)
    b_sig, c_sig = (p.sign_survivors(["site-b", "site-c"], ["site-a"], 0) for p in (b, c))
    # Execute / Assert: site-a sees signatures over another set and reveals nothing
    shown = [spb.SurvivorSignature(site="site-a", signature=a_sig), spb.SurvivorSignature(site="site-b", signature=b_sig),
             spb.SurvivorSignature(site="site-c", signature=c_sig)]
    with pytest.raises(SecAggError, match="not over the survivor set"):
        a.reveal(["site-a", "site-b", "site-c"], [], 0, shown)
    # a site asked to sign a second, different set refuses
    with pytest.raises(SecAggError, match="second, different"):
        a.sign_survivors(["site-a", "site-b"], ["site-c"], 0)
    # too few signatures, or none at all, is refused too
    with pytest.raises(SecAggError, match="needed"):
        b.reveal(["site-b", "site-c"], ["site-a"], 0, [shown[1]])
    with pytest.raises(SecAggError):
        b.reveal(["site-b", "site-c"], ["site-a"], 0, [])
    # the consistent view passes: b sees c's and its own signature over {b, c}
    out = b.reveal(["site-b", "site-c"], ["site-a"], 0, shown[1:])
    assert sorted((r.site, KIND[r.kind]) for r in out) == [("site-a", "mask_key"), ("site-b", "seed"),
                                                           ("site-c", "seed")]
    # a signature over the same set for another attempt does not count
    other = SiteSecAgg(FED, 1, "site-c", sites[2].key, ca.cert_pem, attempt=1)
    other.signed, other.sharers = ("site-b", "site-c"), {"site-a", "site-b"}
    stale = spb.SurvivorSignature(site="site-c", signature=other.sign_survivors(["site-b", "site-c"], ["site-a"], 1))
    with pytest.raises(SecAggError, match="not over the survivor set"):
        b.reveal(["site-b", "site-c"], ["site-a"], 0, [shown[1], stale])
    assert torch is not None
