"""AuditLog.append_many: a batch of records with one group commit (the coordinator's upload committer audits each
batch of accepted updates this way). A kill at any byte of the batch is a CRASH that opening repairs; a line that is
not of the batch is TAMPERED; the fsync count is that of one append."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedcommon import auditlog
from fedcommon.auditlog import AuditLog, read_records, verify

BATCH = 4


def _batch(tmp_path: Path) -> tuple[Path, bytes, bytes, str]:
    """(log, its bytes before the batch, the batch's lines, the head file during the batch)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("round_opened", {"round": 1})
    before = path.read_bytes()
    head_before = json.loads(Path(str(path) + ".head").read_text())
    recs = log.append_many([("update_accepted", {"site": f"s{i}", "round": 1}) for i in range(BATCH)])
    batch = [r["hash"] for r in recs]
    during = json.dumps({**head_before, "pending": batch[-1], "pending_batch": batch})
    return path, before, path.read_bytes()[len(before):], during


def test_a_batch_chains_verifies_and_costs_the_fsyncs_of_one_append(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("one", {})
    one = len(calls)
    recs = log.append_many([("update_accepted", {"site": f"s{i}"}) for i in range(10)])
    assert len(calls) - one == one  # ten records, the fsyncs of one
    assert [r["seq"] for r in recs] == list(range(2, 12)) and log.head.seq == 11
    assert verify(tmp_path / "audit.jsonl").ok
    assert [r["fields"].get("site") for r in read_records(tmp_path / "audit.jsonl")][1:] == [f"s{i}" for i in range(10)]


def test_a_kill_at_every_line_end_and_torn_byte_of_a_batch_opens_and_records_the_repair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    path, before, lines, during = _batch(tmp_path / "src")
    cuts = sorted({0, len(lines)} | {i + 1 for i, b in enumerate(lines) if b == ord("\n")}
                  | set(range(1, len(lines), 37)))
    for n, cut in enumerate(cuts):
        p = tmp_path / f"k{n}" / "audit.jsonl"
        p.parent.mkdir()
        p.write_bytes(before + lines[:cut])
        Path(str(p) + ".head").write_text(during)
        assert verify(p).verdict == "CRASH", (cut, verify(p).problems)
        log = AuditLog(p)  # repairs: cuts a torn line, completes the head, records it
        assert verify(p).verdict == "OK", (cut, verify(p).problems)
        assert p.read_bytes().startswith(before)
        assert read_records(p)[-1]["event"] == "audit_recovered" and log.head.seq == len(read_records(p))
    # a power cut's block of zeros inside the batch is torn too
    p = tmp_path / "zeros" / "audit.jsonl"
    p.parent.mkdir()
    first_nl = lines.index(b"\n") + 1
    p.write_bytes(before + lines[:first_nl] + b"\0" * 50 + b"\n" + lines[first_nl:])
    Path(str(p) + ".head").write_text(during)
    assert verify(p).verdict == "CRASH", verify(p).problems
    AuditLog(p)
    assert verify(p).ok


def test_a_line_that_is_not_of_the_pending_batch_is_tampering(tmp_path: Path) -> None:
    path, before, lines, during = _batch(tmp_path)
    forged = AuditLog(tmp_path / "other.jsonl")  # a well-formed, chained record that the writer never wrote
    forged.head = auditlog.Head(1, json.loads(before.splitlines()[-1])["hash"])
    rec = forged.append("update_accepted", {"site": "mallory"})
    path.write_bytes(before + auditlog._canonical(rec) + b"\n")
    Path(str(path) + ".head").write_text(during)
    report = verify(path)
    assert report.verdict == "TAMPERED" and "appended without the log's writer" in report.problems[0], report.problems
