"""Hash-chained audit log: appends verify; any edit, removal, reorder or cut-off is found and located; what a kill at
any point of an append leaves opens, is repaired and recorded, and verifies as CRASH, never TAMPERED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


@pytest.mark.parametrize("bad", [b"raw", float("nan"), object(), {1: "x"}, "x" * 5000])
def test_refuses_values_that_must_not_be_logged(tmp_path: Path, bad: object) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    with pytest.raises(AuditError):
        log.append("e", {"v": bad})
    assert verify(tmp_path / "a.jsonl").records == 0


# -- crash recovery ---------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
N = 3  # whole records before the one a crash interrupts


def _write(path: Path, data: bytes, head: str) -> None:
    path.write_bytes(data)
    Path(str(path) + ".head").write_text(head)


def _recovered(path: Path) -> list[dict]:
    return [r for r in read_records(path) if r["event"] == "audit_recovered"]


def _crash_state(tmp_path: Path, note: int) -> tuple[Path, bytes, bytes, dict[str, str]]:
    """(log path, the N whole records' bytes, the interrupted record N+1's line, head files "pending" (this writer's
    head during an append) and "legacy" (the older writer's head, with no pending key)); the log holds all N+1."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(N):
        log.append("update_uploaded", {"round": i + 1, "payload_sha256": f"{i:064x}"})
    before = path.read_bytes()
    head_before = json.loads(Path(str(path) + ".head").read_text())
    rec = log.append("update_refused", {"round": 9, "note": "x" * note})
    line = path.read_bytes()[len(before):]
    heads = {"pending": json.dumps({**head_before, "pending": rec["hash"]}),
             "legacy": json.dumps({"seq": head_before["seq"], "hash": head_before["hash"]})}
    return path, before, line, heads


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The states are made by writing the files directly, so durability is beside the point (and fsync is slow)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture
def crash_state(tmp_path: Path, no_fsync: None) -> tuple[Path, bytes, bytes, dict[str, str]]:
    return _crash_state(tmp_path, 40)


def _assert_recovers(path: Path, before: bytes, cut: int) -> None:
    """Open succeeds, the N records are untouched, the repair is recorded (with the bytes cut), the log is then clean
    and appending carries on."""
    assert verify(path).verdict == "CRASH", verify(path)
    log = AuditLog(path)
    assert path.read_bytes().startswith(before)
    rec = _recovered(path)[-1]
    assert rec["seq"] == log.head.seq
    if cut:
        assert rec["fields"]["cut"]["bytes"] == cut and rec["fields"]["cut"]["offset"] == len(before)
    else:
        assert "cut" not in rec["fields"]
    assert verify(path).verdict == "OK", verify(path).problems
    nxt = log.append("after", {})
    assert nxt["seq"] == log.head.seq and verify(path).ok


@pytest.mark.parametrize("head", ["pending", "legacy"])
def test_a_kill_at_every_byte_of_an_append_opens_and_records_the_repair(crash_state, head: str) -> None:
    """Every prefix of the interrupted record's line (none of it, each torn length, all but the newline, the whole
    line) with the head still at record N: a crash, never tampering. The old code refused to open the whole-line
    case ("says 3 records but the log has 4", the finding) and cut torn bytes without recording it."""
    path, before, line, heads = crash_state
    for k in range(len(line) + 1):
        if head == "legacy" and k == 0:
            continue  # the older head with no pending record and nothing after it is simply clean
        _write(path, before + line[:k], heads[head])
        whole = k == len(line)
        _assert_recovers(path, before + (line if whole else b""), cut=0 if whole else k)
        if whole:
            assert _recovered(path)[-1]["fields"]["head_completed"] == {"from_seq": N, "to_seq": N + 1}


def test_a_power_cut_block_of_zeros_before_the_newline_is_torn_not_tampering(crash_state) -> None:
    path, before, line, heads = crash_state
    _write(path, before + line[:100] + b"\0" * (len(line) - 101) + b"\n", heads["pending"])
    _assert_recovers(path, before, cut=len(line))


def test_a_kill_while_recovering_is_recovered_again_and_the_cut_stays_recorded(tmp_path: Path, no_fsync: None) -> None:
    """The recovery record is written over the torn bytes before the file is cut: kill it after any byte of that
    write (and with the rest of the torn bytes still behind it) and the next open repairs and records again."""
    path, before, line, heads = _crash_state(tmp_path, 3000)
    torn = line[:2500]
    _write(path, before + torn, heads["pending"])
    AuditLog(path)
    rec_line = path.read_bytes()[len(before):]
    rec = json.loads(rec_line)
    assert len(rec_line) < len(torn) and rec["fields"]["cut"]["bytes"] == len(torn)
    pending = json.dumps({**json.loads(heads["pending"]), "pending": rec["hash"]})
    for j in range(len(rec_line) + 1):
        _write(path, before + rec_line[:j] + torn[j:], pending)
        AuditLog(path)
        assert verify(path).ok
        assert any("cut" in r["fields"] for r in _recovered(path))
        assert path.read_bytes().startswith(before)


_KILL_CHILD = """
import os, signal, sys
from fedcommon import auditlog, durable
step, target = [0], int(sys.argv[2])
def point(real):
    def f(*a):
        step[0] += 1
        if step[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a)
    return f
os.fsync, os.replace = point(os.fsync), point(os.replace)
auditlog.AuditLog(sys.argv[1]).append("update_refused", {"round": 2, "site": "s"})
"""


def test_a_real_sigkill_before_each_durable_step_of_an_append_opens_clean(tmp_path: Path) -> None:
    """A child process appends and SIGKILLs itself before its k-th fsync or rename, for every k; the parent opens
    the log. The old code refused to open after the kill between the record's fsync and the head's rename."""
    path = _log(tmp_path, N)
    base = path.read_bytes()
    verdicts = []
    for k in range(1, 12):
        p = tmp_path / f"k{k}" / "audit.jsonl"
        p.parent.mkdir()
        p.write_bytes(base)
        Path(str(p) + ".head").write_bytes(Path(str(path) + ".head").read_bytes())
        r = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(p), str(k)], cwd=ROOT, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode == 0:
            break  # past the last step: the append completed
        assert r.returncode == -signal.SIGKILL
        verdicts.append(verify(p).verdict)
        log = AuditLog(p)
        assert p.read_bytes().startswith(base) and verify(p).ok
        assert log.append("after", {})["seq"] == log.head.seq
    assert len(verdicts) >= 6 and "TAMPERED" not in verdicts and "CRASH" in verdicts, verdicts


# -- tampering is still TAMPERED (and the log refuses to open) -------------------------------------------------------
def _forge_after(path: Path, n: int = 1) -> None:
    from fedcommon.auditlog import record_hash

    recs = read_records(path)
    for _ in range(n):
        last = recs[-1]
        forged = {**last, "seq": last["seq"] + 1, "prev": last["hash"], "event": "update_accepted"}
        forged["hash"] = record_hash(forged)
        recs.append(forged)
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in recs))


def _tamper(name: str, path: Path, before: bytes, line: bytes, heads: dict[str, str]) -> None:
    hp = Path(str(path) + ".head")
    done = hp.read_text()
    whole = path.read_bytes()
    if name == "head_ahead_of_a_cut_record":  # the last record removed, the head left naming it
        _write(path, before, done)
    elif name == "head_ahead_of_a_torn_record":  # the head names the record as done, yet it is torn
        _write(path, before + line[:50], done)
    elif name == "one_forged_record_after_a_done_head":
        _forge_after(path)
    elif name == "forged_record_not_the_pending_one":
        _write(path, before, heads["pending"])
        _forge_after(path)
    elif name == "two_records_beyond_a_pending_head":
        _write(path, whole, heads["pending"])
        _forge_after(path)
    elif name == "non_json_line_in_the_middle":
        lines = whole.splitlines(keepends=True)
        lines[1] = b"garbage\n"
        path.write_bytes(b"".join(lines))
    elif name == "non_json_last_line_the_head_covers":
        path.write_bytes(before + b"garbage\n")
    elif name == "edited_middle_line":
        path.write_bytes(whole.replace(b'"round":2', b'"round":7'))
    elif name == "unreadable_head_file":
        hp.write_text("{not json")


TAMPERS = ["head_ahead_of_a_cut_record", "head_ahead_of_a_torn_record", "one_forged_record_after_a_done_head",
           "forged_record_not_the_pending_one", "two_records_beyond_a_pending_head", "non_json_line_in_the_middle",
           "non_json_last_line_the_head_covers", "edited_middle_line", "unreadable_head_file"]


@pytest.mark.parametrize("name", TAMPERS)
def test_tampering_is_still_tampered_and_refused(crash_state, name: str) -> None:
    path, before, line, heads = crash_state
    _tamper(name, path, before, line, heads)
    report = verify(path)
    assert report.verdict == "TAMPERED", (report.problems, report.crash)
    with pytest.raises(AuditError, match="does not verify"):
        AuditLog(path)


def test_head_kept_elsewhere_may_lag_but_not_lead(crash_state) -> None:
    path, before, line, heads = crash_state
    recs = read_records(path)
    assert verify(path, expected_head=Head(N, recs[N - 1]["hash"])).ok  # the store's copy is written after the log
    _write(path, before + line[:10], heads["pending"])
    assert verify(path, expected_head=Head(N + 1, recs[N]["hash"])).verdict == "TAMPERED"


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_audit_verify_clis_say_crash_not_tampered(crash_state) -> None:
    """``fedbridge-site audit verify`` and ``fedbridge-admin audit verify``: exit 3 and CRASH for a crash-left log,
    where the old code said TAMPERED, exit 1 (tampering is still exit 1 TAMPERED: tests/site_agent/test_egress_and_audit.py
    and tests/coordinator/test_admin_pki_cli.py)."""
    path, before, line, heads = crash_state
    _write(path, before + line, heads["pending"])
    site = _cli("site_agent", "audit", "verify", "--log", path)
    admin = _cli("coordinator", "audit", "verify", "--state-dir", path.parent)
    for r in (site, admin):
        assert r.returncode == 3 and "CRASH" in r.stdout and "TAMPERED" not in r.stdout, r.stdout + r.stderr
