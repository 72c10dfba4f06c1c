"""A crash between storing an update and appending its ``update_accepted`` record (the store commits first) leaves
an accepted update with no record; the next start records it (``recovered``), once, so the audit log again names
every update the store counts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from test_engine import _engine
from test_rounds import _joined, _send

from coordinator.rounds.engine import RoundEngine


def _accepted(eng: RoundEngine) -> list[dict[str, Any]]:
    lines = (eng.store.dir / "audit.jsonl").read_text().splitlines()
    return [r["fields"] for r in map(json.loads, lines) if r["event"] == "update_accepted"]


def test_an_update_stored_but_not_audited_is_recorded_at_the_next_start(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: the acceptance record of a's update lost, as a kill right after the store's commit would
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        (a,) = _joined(eng, "a")
        real = eng.ingress._audit_many  # acceptances are audited in batches, one group commit each
        eng.ingress._audit_many = lambda events: real([(e, f) for e, f in events if e != "update_accepted"])
        assert await _send(eng, a, 1, 1.0, 1.0)
        assert _accepted(eng) == [] and len(eng.store.updates()) == 1

        # Execute: the coordinator starts again on that state, twice
        for _ in range(2):
            eng = _engine(tmp_path, min_sites=2)
            await eng.start()

        # Assert: one record, marked recovered, naming the stored update
        (rec,) = _accepted(eng)
        (u,) = eng.store.updates()
        assert rec["recovered"] is True and (rec["site"], rec["round"], rec["payload_sha256"]) == ("a", 1, u.payload_sha256)
    asyncio.run(main())
