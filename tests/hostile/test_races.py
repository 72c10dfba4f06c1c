"""Concurrent uploads of one site for one round: exactly one update is accepted, every other stream is refused with
ALREADY_EXISTS and audited, and the stored file is the accepted one's bytes (its hash is the recorded hash)."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import grpc
from attacker import assert_healthy, envelope, payload_for, sha256_hex, sign, upload_messages
from conftest import Coordinator
from proto_client import Wire

SC = grpc.StatusCode


def _race(coord: Coordinator, wire: Wire, task: Any, site: str, n: int) -> tuple[list[Any], list[bytes]]:
    """``n`` validly signed, different updates of ``site`` streamed at once, their last chunks released together."""
    key = coord.site(site).signer()
    payloads = [payload_for(task, value=0.01 * (i + 1)) for i in range(n)]
    signed = [sign(wire, envelope(wire, task, site, p), key) for p in payloads]
    started, go = threading.Barrier(n), threading.Event()
    results: list[Any] = [None] * n

    def messages(i: int) -> Any:
        msgs = list(upload_messages(wire, signed[i], payloads[i], chunk=len(payloads[i]) // 2 + 1))
        yield msgs[0]
        # Generous waits: on two busy cores starting n streams can take seconds; a broken barrier is no race.
        started.wait(60)  # every stream has begun before any completes
        go.wait(60)
        yield from msgs[1:]

    def run(i: int) -> None:
        stub = wire.stub(coord.channel(coord.site(site)), "FederationService")
        try:
            results[i] = stub.UploadUpdate(messages(i), timeout=120)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(150)
    return results, payloads


def _check_one_winner(coord: Coordinator, site: str, results: list[Any], payloads: list[bytes]) -> None:
    won = [i for i, r in enumerate(results) if not isinstance(r, grpc.RpcError) and r.accepted]
    lost = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(won) == 1, results
    assert [e.code() for e in lost] == [SC.ALREADY_EXISTS] * (len(results) - 1), [(e.code(), e.details()) for e in lost]
    rows = coord.db("SELECT payload_sha256, path FROM updates WHERE site=?", (site,))
    assert len(rows) == 1
    recorded, path = rows[0]
    assert recorded == sha256_hex(payloads[won[0]])
    stored = (coord.fed / "state" / path).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == recorded  # the file is the accepted update, not a loser's bytes
    refusals = [r for r in coord.audit() if r["event"] == "update_refused" and r["fields"]["site"] == site]
    assert [r["fields"]["status"] for r in refusals] == ["ALREADY_EXISTS"] * (len(results) - 1)


def test_two_concurrent_streams_one_update(coord: Coordinator, wire: Wire, task: Any) -> None:
    results, payloads = _race(coord, wire, task, "site-b", 2)
    _check_one_winner(coord, "site-b", results, payloads)
    assert_healthy(coord, wire, "site-b")


def test_many_parallel_streams_one_update(coord: Coordinator, wire: Wire, task: Any) -> None:
    # More streams than the partial-upload cap (3): the ones over it are refused up front, RESOURCE_EXHAUSTED.
    results, payloads = _race(coord, wire, task, "site-g", 6)
    won = [r for r in results if not isinstance(r, grpc.RpcError)]
    codes = sorted(r.code().name for r in results if isinstance(r, grpc.RpcError))
    assert len(won) == 1 and won[0].accepted
    assert set(codes) <= {"ALREADY_EXISTS", "RESOURCE_EXHAUSTED"} and codes.count("ALREADY_EXISTS") >= 1, codes
    assert len(coord.db("SELECT 1 FROM updates WHERE site=?", ("site-g",))) == 1
    assert_healthy(coord, wire, "site-g")
