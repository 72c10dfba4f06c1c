"""Safe defaults (issue 14, item 2), in process: a site that reports its own crash is shown failed and not waited for;
a site silent past the heartbeat timeout is shown silent; each change is one audit record; a site that joins or
calls again is active again; and heartbeats and a deadline are on by default."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_engine import _engine
from test_rounds import _joined, _send, _wait_state

from coordinator.admin import views
from coordinator.config import QuorumSpec
from coordinator.errors import InvalidUpdate
from coordinator.rounds.engine import RoundEngine


def _audit(eng: RoundEngine, *events: str) -> list[dict]:
    lines = (eng.store.dir / "audit.jsonl").read_text().splitlines()
    return [r["fields"] for r in map(json.loads, lines) if r["event"] in events]


def _site(eng: RoundEngine, name: str) -> dict:
    return next(s for s in views.sites(eng) if s["name"] == name)


def test_a_failed_site_is_shown_failed_and_the_round_closes_without_it(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: k = 2 of 2, close with 1; the default heartbeat timeout (300 s) and deadline (24 h)
        eng = _engine(tmp_path, min_sites=2, quorum=QuorumSpec(min_at_deadline=1))
        await eng.start()
        a, b = _joined(eng, "a", "b")
        assert await _send(eng, a, 1, 1.0, 1.0)
        await asyncio.sleep(0.6)
        assert eng.store.rounds()[0].state == "open"  # b is alive: the round waits for it

        # Execute: b reports its crash (twice: recorded once)
        eng.report_error(b.peer, 1, "train", "RuntimeError", "CUDA out of memory")
        eng.report_error(b.peer, 1, "train", "RuntimeError", "again")
        failed_view, status_view = _site(eng, "b"), views.status(eng)
        await _wait_state(eng, 1, "closed", timeout=3)

        # Assert: shown failed (sites, status), one audit record, the round closed with a alone
        assert failed_view["status"] == "failed" and failed_view["problem"] == "failed: RuntimeError: CUDA out of memory"
        assert status_view["site_problems"] == ["b failed: RuntimeError: CUDA out of memory"]
        assert [r["error"] for r in _audit(eng, "site_failed")] == ["RuntimeError: CUDA out of memory"]
        ev = eng.store.events(1)
        assert [e["event"] for e in ev] == ["site_failed", "all_remaining_answered"]
        assert ev[1]["detail"]["failed"] == ["b"] and ev[1]["detail"]["sites"] == ["a"]
        # b joins again: active again, one record
        eng.join(b.peer, "test", 0)
        assert _site(eng, "b")["status"] == "active" and views.status(eng)["site_problems"] == []
        assert [r["was"] for r in _audit(eng, "site_back")] == ["failed"]
    asyncio.run(main())


@pytest.mark.parametrize("args", [("RuntimeError", "x" * 201), ("RuntimeError", "two\nlines"), ("not a class", "m"),
                                  ("", "m")])
def test_a_bad_report_is_refused_whole(tmp_path: Path, args: tuple[str, str]) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        (a,) = _joined(eng, "a")
        with pytest.raises(InvalidUpdate, match="ReportError"):
            eng.report_error(a.peer, 1, "train", *args)
        assert _site(eng, "a")["status"] == "active" and _audit(eng, "site_failed") == []
    asyncio.run(main())


def test_a_silent_site_is_shown_silent_once_and_active_when_it_calls_again(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2, quorum=QuorumSpec(heartbeat_timeout_s=0.4))
        await eng.start()
        (a,) = _joined(eng, "a")
        assert _site(eng, "a")["status"] == "active"

        await asyncio.sleep(1.2)  # three timeouts: marked once
        silent = _site(eng, "a")
        eng.heartbeat(a.peer, 1, "train", 3, 10)

        assert silent["status"] == "silent" and silent["problem"].startswith("silent: no call for")
        assert [r["site"] for r in _audit(eng, "site_silent")] == ["a"]
        assert _site(eng, "a")["status"] == "active"
        assert [r["was"] for r in _audit(eng, "site_back")] == ["silent"]
    asyncio.run(main())


def test_heartbeats_and_a_deadline_are_on_by_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    from coordinator.config import load_federation_config
    from coordinator.trust.enrolment import InitOptions, init_federation

    q = QuorumSpec()
    assert q.heartbeat_timeout_s == 300 and q.deadline_s == 86400
    init_federation(tmp_path / "fed", InitOptions(federation_id="f", base_model=tiny_model_dir, hosts=("localhost",)))
    text = (tmp_path / "fed" / "federation.toml").read_text()
    assert "[quorum]" in text
    cfg = load_federation_config(tmp_path / "fed" / "federation.toml")
    assert cfg.quorum.heartbeat_timeout_s == 300 and cfg.quorum.deadline_s == 86400
    assert cfg.min_sites == 2 and cfg.min_to_close == 1  # a round closes without one dead site
