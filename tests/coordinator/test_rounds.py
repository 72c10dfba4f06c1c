"""Round lifecycle (issue 6, item 2), in process: k-of-n quorum, deadline, abandon and retry, heartbeat drops, and
the late-update policies (drop, next_round with FedAsync staleness weighting). Each decision is in the store, the
round's info and the audit log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from test_engine import Site, _chunks, _delta, _engine

from coordinator.config import QuorumSpec
from coordinator.errors import LateUpdate
from coordinator.rounds.engine import RoundEngine
from fedcommon import tensors
from fedcommon.auditlog import verify


async def _send(eng: RoundEngine, site: Site, round: int, a: float, b: float, n: int = 10) -> bool:
    signed, payload = site.update(round, _delta(a, b), n=n)
    return (await eng.ingress.receive_upload(site.peer, _chunks(signed, payload))).accepted


async def _wait_state(eng: RoundEngine, round: int, state: str, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while next((r.state for r in eng.store.rounds() if r.round == round), None) != state:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def _joined(eng: RoundEngine, *names: str) -> list[Site]:
    sites = [Site(n) for n in names]
    for s in sites:
        eng.join(s.peer, "test", 0)
    return sites


def _events(eng: RoundEngine, round: int) -> list[str]:
    return [e["event"] for e in eng.store.events(round)]


# The audit log also records joins and every accepted/refused update; these tests look at the round decisions.
_PER_UPDATE = {"site_joined", "update_accepted", "update_refused"}


def _audited(eng: RoundEngine) -> list[str]:
    path = eng.store.dir / "audit.jsonl"
    assert verify(path).ok
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    return [e for e in events if e not in _PER_UPDATE]


def test_quorum_closes_at_k_of_n_and_drop_policy_refuses_the_late_site(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: 3 sites, quorum k = 2, late updates dropped
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        a, b, c = _joined(eng, "a", "b", "c")

        # Execute: a and b answer; c answers round 1 after it closed
        assert await _send(eng, a, 1, 1.0, 1.0)
        assert eng.store.rounds()[0].state == "open"
        assert await _send(eng, b, 1, 3.0, 3.0)
        await _wait_state(eng, 1, "closed")
        await _wait_state(eng, 2, "open")  # the engine audits round_closed after the store's close, then opens round 2
        with pytest.raises(LateUpdate, match="late update for round 1 refused: round 1 closed"):
            await _send(eng, c, 1, 100.0, 100.0)

        # Assert: closed at quorum with a and b; c's late update is recorded as dropped and is nowhere in a round
        info = eng.store.rounds()[0].info
        assert info["decisions"][0] == {"event": "quorum_reached", "attempt": 1, "site": "", "updates": 2, "k": 2,
                                              "sites": ["a", "b"]}
        assert sorted(info["updates"]) == ["a", "b"] and info["late_updates"] == []
        assert _events(eng, 1) == ["quorum_reached", "late_update_dropped"]
        assert eng.store.events(1)[1]["site"] == "c"
        assert [u.site for u in eng.store.updates()] == ["a", "b"]
        assert torch.allclose(tensors.decode_state(eng.adapters.adapter_bytes(2))["l.lora_B.weight"], torch.full((4, 2), 2.0))
        assert _audited(eng) == ["quorum_reached", "round_closed", "round_opened", "late_update_dropped"]
    asyncio.run(main())


def test_deadline_closes_with_the_sites_that_answered(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: k = 3 of 3, but close at a 0.6 s deadline with at least 2
        eng = _engine(tmp_path, min_sites=3, quorum=QuorumSpec(deadline_s=0.6, min_at_deadline=2))
        await eng.start()
        a, b, _c = _joined(eng, "a", "b", "c")
        offer = await eng.fetch_task(a.peer, 0)
        assert offer.deadline_ms == eng.store.rounds()[0].opened_ms + 600

        # Execute
        assert await _send(eng, a, 1, 1.0, 1.0)
        assert await _send(eng, b, 1, 3.0, 3.0)
        await asyncio.sleep(0.2)
        still_open = eng.store.rounds()[0].state
        await _wait_state(eng, 1, "closed")

        # Assert: it waited for c until the deadline, then closed with a and b and said why
        assert still_open == "open"
        r = eng.store.rounds()[0]
        assert r.closed_ms is not None and r.closed_ms - r.opened_ms >= 600
        d = r.info["decisions"][0]
        assert d["event"] == "deadline_passed" and d["sites"] == ["a", "b"] and d["missing"] == ["c"]
        assert sorted(r.info["updates"]) == ["a", "b"]
    asyncio.run(main())


def test_too_few_at_the_deadline_abandons_the_attempt_keeps_the_update_and_retries(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: k = 2, deadline 0.4 s, no closing with fewer than 2
        eng = _engine(tmp_path, min_sites=2, quorum=QuorumSpec(deadline_s=0.4))
        await eng.start()
        a, b = _joined(eng, "a", "b")

        # Execute: only a answers before the first deadline; b answers in the second attempt
        assert await _send(eng, a, 1, 1.0, 1.0)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if eng.store.rounds()[0].attempt == 2:
                break
        r = eng.store.rounds()[0]
        offer = await eng.fetch_task(b.peer, 0)
        assert await _send(eng, b, 1, 3.0, 3.0)
        await _wait_state(eng, 1, "closed")

        # Assert: attempt 1 abandoned (recorded), the round stayed open with a's update, attempt 2 got a fresh
        # deadline, and the round closed at quorum with both updates
        assert r.state == "open" and r.attempt == 2 and r.attempt_opened_ms >= r.opened_ms + 400
        assert offer.status == "train" and offer.round == 1 and offer.deadline_ms == r.attempt_opened_ms + 400
        ev = eng.store.events(1)
        assert [(e["event"], e["attempt"]) for e in ev] == [("round_abandoned", 1), ("quorum_reached", 2)]
        assert ev[0]["detail"]["sites"] == ["a"] and ev[0]["detail"]["missing"] == ["b"]
        assert sorted(eng.store.rounds()[0].info["updates"]) == ["a", "b"]
        assert "round_abandoned" in _audited(eng)
    asyncio.run(main())


def test_max_attempts_stops_loudly_with_the_state_kept(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2, quorum=QuorumSpec(deadline_s=0.2, max_attempts=2))
        await eng.start()
        a, _b = _joined(eng, "a", "b")
        assert await _send(eng, a, 1, 1.0, 1.0)
        await asyncio.wait_for(eng.failed.wait(), 5)
        assert "giving up (quorum.max_attempts)" in str(eng.fatal)
        assert _events(eng, 1) == ["round_abandoned", "round_given_up"]
        assert [u.site for u in eng.store.updates(1)] == ["a"] and eng.store.rounds()[0].state == "open"
    asyncio.run(main())


def test_silent_site_is_dropped_by_heartbeat_timeout_and_the_round_closes_early(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: k = 3 of 3, at least 2, heartbeat timeout 0.5 s, a long deadline that must not be needed
        eng = _engine(tmp_path, min_sites=3,
                      quorum=QuorumSpec(deadline_s=30, min_at_deadline=2, heartbeat_timeout_s=0.5))
        await eng.start()
        a, b, c = _joined(eng, "a", "b", "c")
        assert await _send(eng, a, 1, 1.0, 1.0)
        assert await _send(eng, b, 1, 3.0, 3.0)

        # Execute: c beats for 1 s (so it is alive and the round waits), then falls silent
        for step in range(10):
            ack = eng.heartbeat(c.peer, 1, "train", step, 20)
            assert ack.round_open and ack.current_round == 1 and ack.interval_ms == 200  # timeout / 3, at least 200 ms
            await asyncio.sleep(0.1)
        waited = eng.store.rounds()[0].state
        await _wait_state(eng, 1, "closed", timeout=3)

        # Assert
        assert waited == "open"
        ev = eng.store.events(1)
        assert [e["event"] for e in ev] == ["site_dropped", "all_remaining_answered"]
        assert ev[0]["site"] == "c" and ev[0]["detail"]["last_progress"] == [1, "train", 9, 20]
        assert ev[1]["detail"]["dropped"] == ["c"]
        assert not eng.heartbeat(c.peer, 1, "train", 11, 20).round_open
    asyncio.run(main())


def test_next_round_policy_carries_the_late_update_with_staleness_weight(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: 3 sites, k = 2, late updates go into the next round weighted (1 + s)^-0.5
        eng = _engine(tmp_path, min_sites=2, quorum=QuorumSpec(late_policy="next_round", staleness_exponent=0.5))
        await eng.start()
        a, b, c = _joined(eng, "a", "b", "c")
        assert await _send(eng, a, 1, 1.0, 1.0)
        assert await _send(eng, b, 1, 3.0, 3.0)
        await _wait_state(eng, 2, "open")
        g2 = tensors.decode_state(eng.adapters.adapter_bytes(2))

        # Execute: c's round-1 update arrives in round 2; c then trains round 2 too, and so does a
        assert await _send(eng, c, 1, 10.0, 10.0)
        assert (await eng.fetch_task(c.peer, 0)).status == "train"  # its late update does not count as round 2's
        assert await _send(eng, c, 2, 4.0, 4.0)
        assert await _send(eng, a, 2, 2.0, 2.0)
        await _wait_state(eng, 2, "closed")

        # Assert: the store tells trained round and weight; round 2 aggregated a, c and c's stale update
        w = 2 ** -0.5
        late = eng.store.update_trained_on("c", 1)
        assert late is not None and late.round == 2 and late.staleness == 1 and late.weight == pytest.approx(w)
        assert sorted((u.site, u.trained_round) for u in eng.store.updates(2)) == [("a", 2), ("c", 1), ("c", 2)]
        info = eng.store.rounds()[1].info
        assert info["late_updates"][0]["trained_round"] == 1 and info["late_updates"][0]["weight"] == pytest.approx(w)
        assert [d["event"] for d in info["decisions"]] == ["late_update_carried", "quorum_reached"]
        assert info["decisions"][1]["sites"] == ["a", "c"]
        expect = (10 * 2.0 + 10 * 4.0 + 10 * w * 10.0) / (20 + 10 * w)
        out = tensors.decode_state(eng.adapters.adapter_bytes(3))
        assert torch.allclose(out["l.lora_B.weight"], g2["l.lora_B.weight"] + expect)
        assert "late_update_carried" in _audited(eng)
    asyncio.run(main())


def test_restart_in_closing_state_aggregates_exactly_the_decided_updates(tmp_path: Path) -> None:
    async def main() -> None:
        # Prepare: a's update is in and the decision to close round 1 (deadline) is committed; then the process dies
        first = _engine(tmp_path, min_sites=2)
        await first.start()
        a, b = _joined(first, "a", "b")
        assert await _send(first, a, 1, 1.0, 1.0)
        first.store.mark_closing(1, 1, "deadline_passed", {"updates": 1})

        # Execute: a new engine on the same state dir; b's update arrives before and after it resumed
        again = _engine(tmp_path, min_sites=2)
        with pytest.raises(LateUpdate):
            await _send(again, b, 1, 3.0, 3.0)
        await again.start()
        await _wait_state(again, 1, "closed")

        # Assert: aggregated with exactly a's update, although the quorum k = 2 was never reached
        assert sorted(again.store.rounds()[0].info["updates"]) == ["a"]
        out = tensors.decode_state(again.adapters.adapter_bytes(2))
        assert torch.allclose(out["l.lora_B.weight"], torch.full((4, 2), 1.0))
    asyncio.run(main())


def test_state_dir_from_before_quorum_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from coordinator.rounds.store import Store

    # Prepare: the schema of rounds/updates as state dirs hold it from before (key (round, site), no attempts)
    (tmp_path / "state").mkdir()
    con = sqlite3.connect(tmp_path / "state" / "coordinator.db")
    con.executescript("""
    CREATE TABLE rounds (round INTEGER PRIMARY KEY, state TEXT NOT NULL, input_sha256 TEXT NOT NULL,
      output_sha256 TEXT, opened_ms INTEGER NOT NULL, closed_ms INTEGER, info TEXT);
    CREATE TABLE updates (round INTEGER NOT NULL, site TEXT NOT NULL, payload_sha256 TEXT NOT NULL,
      size INTEGER NOT NULL, num_examples INTEGER NOT NULL, nonce BLOB NOT NULL UNIQUE, envelope BLOB NOT NULL,
      signature BLOB NOT NULL, path TEXT NOT NULL, accepted_ms INTEGER NOT NULL, PRIMARY KEY (round, site));
    INSERT INTO rounds VALUES (1, 'closed', 'in1', 'out1', 5, 6, '{}'), (2, 'open', 'out1', NULL, 7, NULL, NULL);
    INSERT INTO updates VALUES (2, 'a', 'h', 1, 10, x'01', x'02', x'03', 'artifacts/u', 8);
    """)
    con.close()

    # Execute
    store = Store(tmp_path / "state")
    late = store.accept_update(round=2, site="a", payload=b"p", payload_sha256="h2", num_examples=5, nonce=b"n2",
                               envelope=b"e", signature=b"s", trained_round=1, weight=0.5)

    # Assert: old rows read as fresh updates of their round; a late update of the same site fits beside them
    r2 = store.rounds()[1]
    assert (r2.attempt, r2.attempt_opened_ms) == (1, 7)
    assert [(u.site, u.trained_round, u.weight) for u in store.updates(2)] == [("a", 2, 1.0), ("a", 1, 0.5)]
    assert late.staleness == 1 and store.update_trained_on("a", 1) == late
    assert [(e["trained_round"], e["input_sha256"]) for e in store.ledger()] == [(2, "out1"), (1, "in1")]


@pytest.mark.parametrize(("quorum", "min_sites", "message"), [
    ({"late_policy": "later"}, 2, r"quorum.late_policy.*'later' is not one of \('drop', 'next_round'\)"),
    ({"deadline_s": 10, "min_at_deadline": 3}, 2, r"quorum.min_at_deadline.*3 is more than the quorum k \(min_sites = 2\)"),
    ({"min_at_deadline": 1, "deadline_s": 0, "heartbeat_timeout_s": 0}, 2,
     r"quorum.min_at_deadline.*only with quorum.deadline_s or quorum.heartbeat_timeout_s"),
    ({"deadline_s": -1}, 2, r"quorum.deadline_s.*finite number >= 0"),
    ({"max_attempts": -2}, 2, r"quorum.max_attempts.*>= 0"),
])
def test_bad_quorum_config_names_the_field(tmp_path: Path, quorum: dict, min_sites: int, message: str) -> None:
    from coord_helpers import config

    from fedcommon.tomlconfig import ConfigError

    with pytest.raises(ConfigError, match=message):
        config(tmp_path, tmp_path, quorum=quorum, min_sites=min_sites)
    assert config(tmp_path, tmp_path, min_sites=3, quorum={"deadline_s": 5, "min_at_deadline": 2}).min_to_close == 2
    assert config(tmp_path, tmp_path, min_sites=3).min_to_close == 3  # no [quorum]: old configs keep working
