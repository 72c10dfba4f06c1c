"""A site revoked mid-round is not waited for: it counts as dropped at once (as one that reported its crash), so the
round closes with the others' updates (at least ``min_at_deadline``) instead of after the heartbeat timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_engine import _engine
from test_rounds import _joined, _send, _wait_state

from coordinator.config import QuorumSpec


def test_a_revoked_site_is_dropped_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: k = 2 of 2, close with 1; the default heartbeat timeout (300 s) and deadline (24 h)
        eng = _engine(tmp_path, min_sites=2, quorum=QuorumSpec(min_at_deadline=1))
        await eng.start()
        a, b = _joined(eng, "a", "b")
        assert await _send(eng, a, 1, 1.0, 1.0)
        await asyncio.sleep(0.6)
        assert eng.store.rounds()[0].state == "open"  # b may still send: the round waits for it

        # Execute: b is revoked mid-round
        eng.revoke_site("b", "key leaked", "admin")

        # Assert: the round closes with a alone, b named as dropped
        await _wait_state(eng, 1, "closed", timeout=3)
        ev = eng.store.events(1)
        assert [e["event"] for e in ev] == ["all_remaining_answered"]
        assert ev[0]["detail"]["sites"] == ["a"] and ev[0]["detail"]["dropped"] == ["b"]
    asyncio.run(main())
