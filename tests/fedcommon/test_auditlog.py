"""Hash-chained audit log: appends verify; any edit, removal, reorder or cut-off is found and located."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcommon.auditlog import AuditError, AuditLog, Head, read_records, verify


def _log(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(n):
        log.append("update_uploaded", {"round": i + 1, "bytes": 1000 + i, "payload_sha256": f"{i:064x}"})
    return path


def test_appends_verify_and_survive_reopen(tmp_path: Path) -> None:
    path = _log(tmp_path)
    assert verify(path).ok and verify(path).records == 5
    log = AuditLog(path)  # reopen continues the chain
    rec = log.append("policy_refusal", {"rule": "max_steps"})
    assert rec["seq"] == 6
    report = verify(path)
    assert report.ok and report.records == 6 and report.head == rec["hash"]
    assert [r["seq"] for r in read_records(path)] == [1, 2, 3, 4, 5, 6]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_edited_line_is_found(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace('"bytes":1002', '"bytes":1')
    path.write_text("".join(lines))
    report = verify(path)
    assert not report.ok and report.problems[0].startswith("line 3: hash")


def test_removed_line_is_found(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    del lines[1]
    path.write_text("".join(lines))
    assert any(p.startswith("line 2:") for p in verify(path).problems)


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))
    assert any(p.startswith("line 2:") for p in verify(path).problems)


def test_cut_off_tail_is_found_by_head_file_and_by_expected_head(tmp_path: Path) -> None:
    path = _log(tmp_path)
    head = Head.parse((tmp_path / "audit.jsonl.head").read_text())
    path.write_text("".join(_lines(path)[:3]))
    assert any("cut off" in p for p in verify(path).problems)
    (tmp_path / "audit.jsonl.head").unlink()  # a tamperer also removes the head file: the kept copy still catches it
    assert verify(path).ok
    assert not verify(path, expected_head=head).ok


def test_rehashed_forgery_is_found_by_expected_head(tmp_path: Path) -> None:
    """A tamperer who rewrites a line and recomputes every later hash still cannot match a head kept elsewhere."""
    from fedcommon.auditlog import record_hash

    path = _log(tmp_path)
    kept = Head.parse((tmp_path / "audit.jsonl.head").read_text())
    recs = read_records(path)
    recs[1]["fields"]["bytes"] = 7
    prev = recs[0]["hash"]
    for r in recs[1:]:
        r["prev"] = prev
        r["hash"] = record_hash(r)
        prev = r["hash"]
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in recs))
    (tmp_path / "audit.jsonl.head").unlink()
    assert verify(path).ok
    assert not verify(path, expected_head=kept).ok


def test_refuses_to_append_to_a_tampered_log(tmp_path: Path) -> None:
    path = _log(tmp_path)
    path.write_text(path.read_text().replace('"round":2', '"round":9'))
    with pytest.raises(AuditError, match="does not verify"):
        AuditLog(path)


def test_torn_last_line_is_dropped_on_open(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    with open(path, "a") as f:
        f.write('{"seq":3,"ts":"x","ev')  # crash mid-write
    log = AuditLog(path)
    assert log.append("x", {})["seq"] == 3
    assert verify(path).ok


@pytest.mark.parametrize("bad", [b"raw", float("nan"), object(), {1: "x"}, "x" * 5000])
def test_refuses_values_that_must_not_be_logged(tmp_path: Path, bad: object) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(AuditError):
        log.append("e", {"v": bad})
    assert verify(tmp_path / "a.jsonl").records == 0
