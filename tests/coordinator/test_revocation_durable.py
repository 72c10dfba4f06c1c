"""Revocations and the audit head survive a coordinator restart; a cut-off audit log stops the coordinator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from live_coordinator import small_init

from coordinator.config import FederationConfig, TlsSpec
from coordinator.errors import Revoked
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.trust.pki import PeerIdentity
from fedcommon.auditlog import Head, verify

BASE_SHA = "ab" * 32


def _engine(tmp_path: Path) -> RoundEngine:
    cfg = FederationConfig(federation_id="fed", base_model=tmp_path / "base", state_dir=tmp_path / "state",
                           registry_dir=tmp_path / "reg", tls=TlsSpec(Path("c"), Path("c"), Path("k")), rounds=1)
    return RoundEngine(cfg, Store(cfg.state_dir), BASE_SHA, small_init())


def test_revocation_survives_a_restart(tmp_path: Path) -> None:
    peer = PeerIdentity("site-a", "site", None, 1, "fp")

    async def first() -> None:
        eng = _engine(tmp_path)
        await eng.start()
        eng.join(peer, "v", 0)
        eng.revoke_site("site-a", "stolen laptop", "admin")
        eng.store.close()

    async def second() -> None:
        eng = _engine(tmp_path)
        await eng.start()
        with pytest.raises(Revoked, match="stolen laptop"):
            eng.join(peer, "v", 0)
        with pytest.raises(Revoked):
            await eng.fetch_task(peer, 0)
        head = Head.parse(eng.store.get_meta("audit_head") or "")
        assert verify(eng.audit.path, expected_head=head).ok and head.seq == eng.audit.head.seq
        eng.store.close()

    asyncio.run(first())
    asyncio.run(second())


def test_coordinator_refuses_to_extend_an_audit_log_that_lost_its_tail(tmp_path: Path) -> None:
    async def first() -> None:
        eng = _engine(tmp_path)
        await eng.start()
        for s in ("a", "b", "c"):
            eng.join(PeerIdentity(s, "site", None, 1, s), "v", 0)
        eng.store.close()

    asyncio.run(first())
    log = tmp_path / "state" / "audit.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:1]))
    (tmp_path / "state" / "audit.jsonl.head").unlink()
    with pytest.raises(RuntimeError, match="cut off"):
        _engine(tmp_path)
