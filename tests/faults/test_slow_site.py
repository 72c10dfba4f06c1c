"""A real slow site misses the deadline (issue 6, item 2): three site processes, quorum k = 3 but close at the
deadline with 2; site-c is SIGSTOPped in the middle of its round-1 training and SIGCONTed once round 1 closed. The
round closes at the deadline with the other two, the decision is recorded (store, round info, demo round table,
audit log), and site-c's late update is refused (``drop``) or carried into round 2 with its staleness weight
(``next_round``). In the fault suite: "a site slower than the deadline"; not compared with the reference adapter
(three sites, and the round closes without one), it asserts the deadline decision and each update counted once."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import faultkit
import pytest

from coordinator.rounds.store import Store
from fedcommon.auditlog import verify
from sandbox import localfed
from sandbox.demo import read_store, round_table

DEADLINE_S = 30.0
SLOW = "site-c"


def _round_state(state_dir: Path, round: int) -> str | None:
    db = state_dir / "coordinator.db"
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT state FROM rounds WHERE round=?", (round,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return row[0] if row else None


def _wait(cond, fed: localfed.LocalFederation, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        for name, p in fed.procs.items():
            assert p.poll() is None, f"{name} exited:\n" + localfed._tail(fed.log_path(name))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s:\n" + localfed._tail(fed.log_path("coordinator")))
        time.sleep(0.02)


def _run_with_straggler(root: Path, base: Path, policy: str) -> localfed.LocalFederation:
    fed = localfed.prepare(root, base, n_sites=3, rounds=2, min_sites=3, federation_id="slow",
                           training={"max_steps": 8, "batch_size": 2, "learning_rate": 3e-3, "max_length": 64},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}, n_train=16, n_heldout=4,
                           quorum={"deadline_s": DEADLINE_S, "min_at_deadline": 2, "heartbeat_timeout_s": 120.0,
                                   "late_policy": policy, "staleness_exponent": 0.5})
    slow_log = fed.log_path(SLOW)
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        # SIGSTOP site-c once it trains round 1 (its first step is logged), SIGCONT after round 1 closed without it
        _wait(lambda: slow_log.exists() and f"{SLOW} round 1/2 step " in slow_log.read_text(errors="replace"), fed, 240,
              "site-c training round 1")
        os.killpg(fed.procs[SLOW].pid, signal.SIGSTOP)
        try:
            _wait(lambda: _round_state(fed.state_dir, 1) == "closed", fed, 3 * DEADLINE_S + 120, "round 1 closed")
        finally:
            os.killpg(fed.procs[SLOW].pid, signal.SIGCONT)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=300)
    assert codes == {"site-a": 0, "site-b": 0, SLOW: 0, "coordinator": 0}, (
        localfed._tail(fed.log_path("coordinator")), localfed._tail(slow_log))
    return fed


def _assert_round_1_closed_at_the_deadline(store: Store) -> None:
    r1 = store.rounds()[0]
    closes = [e for e in store.events(1) if e["event"] in ("deadline_passed", "quorum_reached", "all_remaining_answered")]
    assert [e["event"] for e in closes] == ["deadline_passed"]
    assert closes[0]["detail"]["sites"] == ["site-a", "site-b"] and closes[0]["detail"]["missing"] == [SLOW]
    assert closes[0]["attempt"] == r1.attempt  # earlier attempts (if the machine was slow) were abandoned, not closed
    assert r1.closed_ms is not None and r1.closed_ms - r1.attempt_opened_ms >= DEADLINE_S * 1000
    assert sorted(r1.info["updates"]) == ["site-a", "site-b"]
    assert r1.info["decisions"][-1]["event"] == "deadline_passed"


def _audit_events(fed: localfed.LocalFederation) -> list[str]:
    import json

    path = fed.state_dir / "audit.jsonl"
    assert verify(path).ok
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_late_update_dropped(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare + Execute
    fed = _run_with_straggler(tmp_path / "fed", tiny_model_dir, "drop")

    # Assert: round 1 closed at the deadline without site-c; its round-1 update was refused and recorded
    store = Store(fed.state_dir)
    try:
        _assert_round_1_closed_at_the_deadline(store)
        dropped = [e for e in store.events(1) if e["event"] == "late_update_dropped"]
        assert len(dropped) == 1 and dropped[0]["site"] == SLOW and dropped[0]["detail"]["trained_round"] == 1
        assert not any(u.site == SLOW and u.trained_round == 1 for u in store.updates())
        # site-c carried on: it trained round 2, which closed at quorum with all three
        assert sorted((u.site, u.trained_round) for u in store.updates(2)) == [("site-a", 2), ("site-b", 2), (SLOW, 2)]
        assert [e["event"] for e in store.events(2)] == ["quorum_reached"]
        assert len(store.publications()) == 1
    finally:
        store.close()
    faultkit.assert_each_update_once(fed, expected=[(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b"), (2, SLOW)])
    assert "refused as late" in fed.log_path(SLOW).read_text()
    assert "not delivered" not in fed.log_path("site-a").read_text()  # heartbeats reached the coordinator
    audited = _audit_events(fed)
    assert audited.index("deadline_passed") < audited.index("late_update_dropped")
    views, _, _ = read_store(fed.state_dir / "coordinator.db", 2)
    caption = str(round_table(views[0], {}, ["site-a", "site-b", SLOW]).caption)
    assert "deadline passed (attempt" in caption and "missing site-c" in caption
    assert "late update dropped: site-c's update for round 1" in caption


def test_late_update_carried_into_the_next_round_with_staleness_weight(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare + Execute
    fed = _run_with_straggler(tmp_path / "fed", tiny_model_dir, "next_round")

    # Assert: round 1 closed at the deadline; site-c's round-1 update went into round 2 weighted (1 + 1)^-0.5
    store = Store(fed.state_dir)
    try:
        _assert_round_1_closed_at_the_deadline(store)
        assert sorted((u.site, u.trained_round) for u in store.updates(2)) == [
            ("site-a", 2), ("site-b", 2), (SLOW, 1), (SLOW, 2)]
        late = store.update_trained_on(SLOW, 1)
        assert late is not None and late.round == 2 and late.weight == pytest.approx(2 ** -0.5)
        info = store.rounds()[1].info
        assert [(u["site"], u["trained_round"], u["staleness"]) for u in info["late_updates"]] == [(SLOW, 1, 1)]
        assert info["late_updates"][0]["weight"] == pytest.approx(0.7071, abs=1e-4)
        assert [d["event"] for d in info["decisions"]] == ["late_update_carried", "quorum_reached"]
        ledger = [(e["round"], e["site"], e["trained_round"]) for e in store.ledger()]
        assert (2, SLOW, 1) in ledger and (2, SLOW, 2) in ledger
    finally:
        store.close()
    faultkit.assert_each_update_once(fed, expected=[(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b"),
                                                    (2, SLOW), (2, SLOW)])
    assert "late_update_carried" in _audit_events(fed)
    views, _, _ = read_store(fed.state_dir / "coordinator.db", 2)
    caption = str(round_table(views[1], {}, ["site-a", "site-b", SLOW]).caption)
    assert "site-c's update from round 1 (staleness 1, weight 0.707)" in caption
