"""Accepting a complete upload runs off the event loop (issue #15 item 2, found by bench/load.py): the validation
(read, hash, decode, spec and norm checks, fsynced staging copy) in a bounded worker pool, the claim in one group
commit per batch. Each update is still accepted once: same-site races, a round closing under a claim and a site
hanging up mid-acceptance are decided exactly."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from test_engine import Site, _chunks, _delta, _engine

from coordinator.errors import DuplicateUpdate, LateUpdate, UploadBusy
from coordinator.ingress import uploads
from coordinator.rounds import store as store_mod
from coordinator.rounds.store import Claim, Store, UpdateConflict
from fedcommon import compress
from protos import codec

SLOW_S = 0.6


@pytest.fixture
def fresh_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four validation workers whatever the machine's core count (the pools are process-wide, made on first use)."""
    monkeypatch.setattr(uploads, "_pools", {})
    monkeypatch.setattr(uploads, "VALIDATE_WORKERS", 4)


def _slow_decode(monkeypatch: pytest.MonkeyPatch, hold: threading.Event | None = None,
                 entered: threading.Event | None = None) -> list[float]:
    """Make each decode take SLOW_S (a large payload's decode and checks), or wait for ``hold``; returns the start
    times of the decodes."""
    real = compress.decode_update
    starts: list[float] = []

    def slow(payload, spec):  # type: ignore[no-untyped-def]
        starts.append(time.monotonic())
        if entered is not None:
            entered.set()
        if hold is not None:
            assert hold.wait(10)
        else:
            time.sleep(SLOW_S)
        return real(payload, spec)

    monkeypatch.setattr(compress, "decode_update", slow)
    return starts


def test_the_event_loop_stays_free_and_uploads_validate_in_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     fresh_pools: None) -> None:
    starts = _slow_decode(monkeypatch)
    sites = [Site(n) for n in "abcd"]

    async def main() -> tuple[float, float]:
        eng = _engine(tmp_path, min_sites=len(sites))
        await eng.start()
        ups = [s.update(1, _delta(1.0 + i, 2.0)) for i, s in enumerate(sites)]
        t0 = time.monotonic()
        tasks = [asyncio.create_task(eng.ingress.receive_upload(s.peer, _chunks(*u))) for s, u in zip(sites, ups, strict=True)]
        gap, last = 0.0, time.monotonic()
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gap, last = max(gap, now - last), now
        assert all(t.result().accepted for t in tasks)
        assert sorted(u.site for u in eng.store.updates(1)) == list("abcd")  # each accepted once
        return gap, time.monotonic() - t0

    gap, took = asyncio.run(main())
    assert gap < SLOW_S / 2, f"the event loop stalled for {gap:.2f} s while uploads were validated"
    assert max(starts) - min(starts) < SLOW_S, f"the validations ran one after another (starts {starts})"
    assert took < len(sites) * SLOW_S * 0.75, f"4 uploads took {took:.2f} s: not validated in parallel"


def test_the_same_update_streamed_again_during_validation_is_busy_and_accepted_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_pools: None) -> None:
    hold, entered = threading.Event(), threading.Event()
    _slow_decode(monkeypatch, hold, entered)

    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        a = Site("a")
        s, p = a.update(1, _delta(1.0, 2.0))
        first = asyncio.create_task(eng.ingress.receive_upload(a.peer, _chunks(s, p)))
        while not entered.is_set():  # noqa: ASYNC110 - waits for the worker thread
            await asyncio.sleep(0.01)
        with pytest.raises(UploadBusy):  # it would truncate the partial under the reader
            await eng.ingress.receive_upload(a.peer, _chunks(s, p))
        hold.set()
        assert (await first).accepted
        again = await eng.ingress.receive_upload(a.peer, _chunks(s, p))  # a retry after the ack: accepted, no new row
        assert again.accepted
        assert [u.site for u in eng.store.updates(1)] == ["a"]
        assert eng.store.partials_of("a") == []

    asyncio.run(main())


def test_two_different_updates_of_one_site_at_once_one_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    fresh_pools: None) -> None:
    _slow_decode(monkeypatch)  # both are validated at the same time and reach the committer together

    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        a = Site("a")
        one, two = a.update(1, _delta(1.0, 2.0)), a.update(1, _delta(3.0, 4.0))
        got = await asyncio.gather(eng.ingress.receive_upload(a.peer, _chunks(*one)),
                                   eng.ingress.receive_upload(a.peer, _chunks(*two)), return_exceptions=True)
        refused = [g for g in got if isinstance(g, BaseException)]
        assert len(refused) == 1 and isinstance(refused[0], DuplicateUpdate), got
        (row,) = eng.store.updates(1)
        winner = one if got[0] is not refused[0] else two
        assert row.path.read_bytes() == winner[1]
        assert eng.store.partials_of("a") == []  # the winner's was renamed into place, the loser's dropped

    asyncio.run(main())


def test_a_claim_whose_round_closed_meanwhile_is_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             fresh_pools: None) -> None:
    """The round's decision to close lands between the ingress's checks and the claim's transaction: the claim is
    refused in that transaction, the envelope checked again (late, dropped), and the closing round never holds it."""

    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        real = eng.store.claim_updates

        def close_first(claims: list[Claim]):  # type: ignore[no-untyped-def]
            eng.store.mark_closing(1, 1, "deadline_reached", {})
            return real(claims)

        monkeypatch.setattr(eng.store, "claim_updates", close_first)
        a = Site("a")
        with pytest.raises(LateUpdate):
            await eng.ingress.receive_upload(a.peer, _chunks(*a.update(1, _delta(1.0, 2.0))))
        assert eng.store.updates(1) == []

    asyncio.run(main())


def test_an_acceptance_finishes_when_its_stream_is_cancelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             fresh_pools: None) -> None:
    hold, entered = threading.Event(), threading.Event()
    _slow_decode(monkeypatch, hold, entered)

    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        a = Site("a")
        s, p = a.update(1, _delta(1.0, 2.0))
        stream = asyncio.create_task(eng.ingress.receive_upload(a.peer, _chunks(s, p)))
        while not entered.is_set():  # noqa: ASYNC110 - waits for the worker thread
            await asyncio.sleep(0.01)
        stream.cancel()  # the site hung up while its complete upload was being validated
        with pytest.raises(asyncio.CancelledError):
            await stream
        hold.set()
        while eng.ingress._finishing:  # noqa: ASYNC110 - the acceptance runs on
            await asyncio.sleep(0.01)
        assert [u.site for u in eng.store.updates(1)] == ["a"]
        assert eng.ingress.upload_status(a.peer, 1, codec.sha256_hex(p)) == (len(p), True)
        assert not eng.ingress._active

    asyncio.run(main())


def _claim(st: Store, site: str, nonce: bytes, trained: int = 1, **over: object) -> Claim:
    payload = f"payload of {site}".encode()
    fields = dict(round=1, site=site, payload_sha256="h" + site, size=len(payload), num_examples=3, nonce=nonce,
                  envelope=b"e", signature=b"s", trained_round=trained, weight=1.0, event=None,
                  staged=st.stage_payload(payload))
    fields.update(over)
    return Claim(**fields)  # type: ignore[arg-type]


def test_a_batch_of_claims_commits_once_and_decides_each_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = Store(tmp_path / "state")
    st.open_round(1, "in")
    synced: list[Path] = []
    monkeypatch.setattr(store_mod, "fsync_dir", lambda p: synced.append(p))
    batch = [_claim(st, "a", b"n1"), _claim(st, "b", b"n2"), _claim(st, "a", b"n3"), _claim(st, "c", b"n2")]
    got = st.claim_updates(batch)
    assert [type(g).__name__ for g in got] == ["UpdateRow", "UpdateRow", "UpdateConflict", "UpdateConflict"]
    assert [g.kind for g in got if isinstance(g, UpdateConflict)] == ["duplicate", "nonce"]
    assert synced == [st.update_path(1, "a").parent]  # one folder fsync for the whole batch
    assert st.update_path(1, "a").read_bytes() == b"payload of a"
    assert sorted(u.site for u in st.updates(1)) == ["a", "b"]
    assert [c.staged.exists() for c in batch] == [False, False, True, True]  # a refused one is left to the caller


def test_a_claim_that_requires_an_open_round_is_refused_once_it_closes(tmp_path: Path) -> None:
    st = Store(tmp_path / "state")
    st.open_round(1, "in")
    st.mark_closing(1, 1, "quorum_reached", {})
    st.add_revocation("r", "lost laptop", "admin")
    (closed,) = st.claim_updates([_claim(st, "a", b"n1", require_open=True)])
    assert isinstance(closed, UpdateConflict) and closed.kind == "closed"
    (free,) = st.claim_updates([_claim(st, "a", b"n1")])  # without require_open (a restart's own path): stored
    assert not isinstance(free, UpdateConflict)
    st2 = Store(tmp_path / "state2")
    st2.open_round(1, "in")
    st2.add_revocation("r", "lost laptop", "admin")
    (revoked,) = st2.claim_updates([_claim(st2, "r", b"n9", require_open=True)])
    assert isinstance(revoked, UpdateConflict) and revoked.kind == "revoked"
    assert st.updates(1)[0].site == "a" and st2.updates(1) == []



def test_advance_requests_made_while_one_waits_are_coalesced(tmp_path: Path) -> None:
    """Each acceptance asks the engine to advance; while one such pass still waits for the lock, more would only
    read the same state again (200 acceptances reading the round's updates 200 times). Once a pass has started, a
    new request gets a new pass, so no change is missed."""

    async def main() -> tuple[int, int]:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        await asyncio.sleep(0.1)  # start-up's own pass
        calls = 0
        real = eng._advance

        async def counting() -> None:
            nonlocal calls
            calls += 1
            await real()

        eng._advance = counting  # type: ignore[method-assign]
        async with eng._lock:  # a pass holds the lock: the requests made meanwhile queue behind it
            for _ in range(10):
                eng._advance_in_background()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        first = calls
        eng._advance_in_background()
        await asyncio.sleep(0.2)
        return first, calls

    ten, after = asyncio.run(main())
    # Ten requests while a pass waits cost what one request costs (a pass may schedule one follow-up of its own).
    assert ten == after - ten, (ten, after - ten)
