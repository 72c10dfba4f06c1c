"""A site certificate that expires while its connection stays open (TLS checked it only at the handshake) is refused
UNAUTHENTICATED on its next call, naming the expiry, and the refusal is audited once; the peer's expiry is read from
the certificate itself."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from test_engine import Site, _engine

from coordinator.errors import CertificateExpired
from coordinator.trust.pki import create_dev_pki, peer_identity


def test_an_expired_certificate_is_refused_on_its_next_call(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=1)
        await eng.start()
        site = Site("a")
        now_ms = int(time.time() * 1000)
        valid = dataclasses.replace(site.peer, not_after_ms=now_ms + 60_000)
        eng.join(valid, "test", 0)  # still valid: accepted

        expired = dataclasses.replace(site.peer, not_after_ms=now_ms - 1)
        for _ in range(2):
            with pytest.raises(CertificateExpired, match="expired at .*renew") as info:
                eng.require_site(expired)
        assert info.value.status == "UNAUTHENTICATED"
        lines = (eng.store.dir / "audit.jsonl").read_text().splitlines()
        refused = [r for r in map(json.loads, lines) if r["event"] == "access_refused"]
        assert len(refused) == 1 and "expired" in refused[0]["fields"]["reason"]
    asyncio.run(main())


def test_the_expiry_comes_from_the_certificate(tmp_path: Path) -> None:
    kit = create_dev_pki(tmp_path / "pki", ["a"]).sites["a"]
    peer = peer_identity(kit.cert.read_bytes())
    assert peer.not_after_ms > time.time() * 1000 + 86_400_000  # issued for days, not seconds
