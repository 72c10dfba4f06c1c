"""Append-only, hash-chained audit logs, shared by the site agent and the coordinator.

One JSON object per line::

    {"seq": 7, "ts": "2026-11-28T13:40:01.123Z", "event": "update_uploaded", "fields": {...},
     "prev": "<hash of line 6>", "hash": "<sha256 of this record without 'hash', canonical JSON>"}

Line 1 chains to 64 zeros. Editing a line breaks its hash; removing or reordering lines breaks ``seq`` and ``prev``.
Cutting lines off the end leaves a valid chain, so every append also rewrites a small *head* file (``<log>.head``:
the last ``seq`` and ``hash``) and :func:`verify` checks the log reaches that head. Whoever must detect deletion of
the whole tail keeps a copy of the head elsewhere (the coordinator keeps its own in its store) and passes it as
``expected_head``.

Values are ids, hashes, counts and short strings only: never tensors, samples, keys or tokens. :meth:`AuditLog.append`
refuses bytes and anything that is not a JSON scalar, list or string-keyed dict of those.

Every append is fsynced before it returns, so an action recorded "before" it happens is on disk first.

Crashes: an append writes the head file naming the record about to be written (``pending``: its hash), the record's
line, then the head file naming it as the head, each durable before the next. So a kill at any point leaves a torn
last line, or the pending record whole beyond the head, or a pending record not written at all, or nothing amiss.
A batch (:meth:`AuditLog.append_many`) does the same with one head naming every record of the batch as pending
(``pending_batch``, their hashes in order), so a kill leaves a prefix of the batch beyond the head, then a torn tail.
:func:`verify` names those CRASH (not tampering), and opening the log for appending repairs them and records the
repair (``audit_recovered``: the bytes cut, their offset and SHA-256, the head completed). A head ahead of the log or
behind it by more than its pending record, or any bad line before the last, is TAMPERED.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommon.durable import write_durable

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_FIELD_CHARS = 4096


class AuditError(ValueError):
    """A value that must not go into an audit log, or a log that cannot be opened for appending."""


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``record`` without its ``hash`` key, as canonical JSON."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _check_value(path: str, v: Any) -> None:
    if v is None or isinstance(v, (bool, int)):
        return
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise AuditError(f"audit field {path!r} is not finite")
        return
    if isinstance(v, str):
        if len(v) > MAX_FIELD_CHARS:
            raise AuditError(f"audit field {path!r} is longer than {MAX_FIELD_CHARS} characters")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_value(f"{path}[{i}]", x)
        return
    if isinstance(v, Mapping):
        for k, x in v.items():
            if not isinstance(k, str):
                raise AuditError(f"audit field {path!r} has a non-string key")
            _check_value(f"{path}.{k}", x)
        return
    raise AuditError(f"audit field {path!r} has type {type(v).__name__}; only ids, numbers and short strings "
                     "are recorded (never tensors, bytes or keys)")


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "hash": self.hash})

    @classmethod
    def parse(cls, text: str) -> Head:
        d = json.loads(text)
        return cls(int(d["seq"]), str(d["hash"]))


def head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _read_head_file(hp: Path) -> tuple[Head, str | None, bool, list[str]]:
    """The head file's head, its pending record hash (None when no append is in progress), whether it is in the
    older format that had no ``pending`` key, and the hashes of a pending batch (empty when none)."""
    d = json.loads(hp.read_text())
    pending = d.get("pending")
    if pending is not None and not isinstance(pending, str):
        raise ValueError("pending is not a hash")
    batch = d.get("pending_batch", [])
    if not isinstance(batch, list) or not all(isinstance(h, str) for h in batch) or (batch and batch[-1] != pending):
        raise ValueError("pending_batch is not a list of hashes ending with the pending one")
    return Head(int(d["seq"]), str(d["hash"])), pending, "pending" not in d, batch


class AuditLog:
    """A hash-chained log file open for appending (one writer process; thread-safe inside it).

    An append writes, in this order, each step durable before the next: the head file naming the record about to
    be written (``pending``: its hash); the record's line; the head file with the record as the head. So a kill at
    any point leaves a head with a pending record and either no line for it, a torn prefix of it, or the whole of it;
    or a clean log. Opening the log repairs any of these (cuts the torn bytes, completes the head) and records the
    repair as a record of its own (``audit_recovered``). See :func:`verify` for what is a crash and what tampering.

    Args:
        path: The log file (created with its folder if missing).

    Raises:
        AuditError: The existing file is tampered with (it is never appended to then, so nothing is hidden).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        report = verify(self.path)
        if report.tampered:
            raise AuditError(f"{self.path}: the audit log does not verify, refusing to append to it: "
                             f"{report.problems[0]}")
        self.head = Head(report.records, report.head)
        if report.crashed:
            self._recover(report)

    def _recover(self, report: VerifyReport) -> None:
        """Cut a torn tail and complete the head, recording both in one ``audit_recovered`` record.

        The record is written *over* the torn bytes before the file is shortened, so the torn bytes are never gone
        without a record of the cut: a kill in between leaves a torn tail again (or the recovery record whole with
        the rest of the torn bytes after it), which the next open repairs and records the same way.
        """
        for finding in report.crash:
            log.warning("[AuditLog] %s: repairing what a crash left: %s", self.path, finding)
        fields: dict[str, Any] = {"findings": report.crash}
        if report.head_file_seq is not None and report.head_file_seq < report.records:
            fields["head_completed"] = {"from_seq": report.head_file_seq, "to_seq": report.records}
        if report.torn_bytes:
            fields["cut"] = {"bytes": report.torn_bytes, "offset": report.valid_bytes, "sha256": report.torn_sha256}
        self._append(event="audit_recovered", fields=fields, offset=report.valid_bytes if report.torn_bytes else None)

    def append(self, event: str, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append one record and fsync it (and the head file) before returning the record."""
        return self._append(event, fields, offset=None)

    def append_many(self, events: list[tuple[str, Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
        """Append several records with the durability of one (a group commit: five fsyncs for the batch, not five
        per record), in order; each is as :meth:`append` would write it. A kill leaves a prefix of the batch."""
        if len(events) <= 1:
            return [self.append(e, f) for e, f in events]
        checked = []
        for event, fields in events:
            if not event or not isinstance(event, str) or len(event) > 64:
                raise AuditError("audit event must be a non-empty string of at most 64 characters")
            checked.append((event, dict(fields or {})))
            _check_value("fields", checked[-1][1])
        with self._lock:
            recs: list[dict[str, Any]] = []
            prev, seq = self.head.hash, self.head.seq
            for event, fields in checked:
                rec: dict[str, Any] = {"seq": seq + 1, "ts": _utc_now(), "event": event, "fields": fields, "prev": prev}
                rec["hash"] = prev = record_hash(rec)
                seq += 1
                recs.append(rec)
            self._write_head(pending=prev, batch=[r["hash"] for r in recs])
            with open(self.path, "ab") as f:
                start = f.seek(0, os.SEEK_END)
                try:
                    f.write(b"".join(_canonical(r) + b"\n" for r in recs))
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    f.truncate(start)
                    raise
            self.head = Head(seq, prev)
            self._write_head(pending=None)
        return recs

    def _append(self, event: str, fields: Mapping[str, Any] | None, offset: int | None) -> dict[str, Any]:
        if not event or not isinstance(event, str) or len(event) > 64:
            raise AuditError("audit event must be a non-empty string of at most 64 characters")
        fields = dict(fields or {})
        _check_value("fields", fields)
        with self._lock:
            rec: dict[str, Any] = {"seq": self.head.seq + 1, "ts": _utc_now(), "event": event, "fields": fields,
                                   "prev": self.head.hash}
            rec["hash"] = record_hash(rec)
            line = _canonical(rec) + b"\n"
            self._write_head(pending=rec["hash"])
            with open(self.path, "r+b" if offset is not None else "ab") as f:
                start = f.seek(0, os.SEEK_END) if offset is None else f.seek(offset)
                try:
                    f.write(line)
                    # Over torn bytes (recovery), the rest of them goes only after the record is written.
                    f.truncate(start + len(line))
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    # A failed write (disk full) must not leave a prefix that the next append would follow.
                    f.truncate(start)
                    raise
            self.head = Head(rec["seq"], rec["hash"])
            self._write_head(pending=None)
        return rec

    def _write_head(self, pending: str | None, batch: list[str] | None = None) -> None:
        # Atomic and durable (the folder too): a head rename lost to a power cut would let the head fall more than
        # its pending records behind, which verify rightly calls tampering.
        head: dict[str, Any] = {"seq": self.head.seq, "hash": self.head.hash, "pending": pending}
        if batch:
            head["pending_batch"] = batch
        write_durable(head_path(self.path), json.dumps(head).encode())

    def record(self, event: str, fields: Mapping[str, Any]) -> None:
        """The site's ``AuditSink`` protocol."""
        self.append(event, fields)


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    ``problems`` are tampering (each names the line, 1-based, and what is wrong); ``crash`` are what a crash of the
    writer leaves mid-append, repaired and recorded when the writer next opens the log. ``records`` and ``head`` are
    the whole, valid records (a torn tail excluded).
    """

    path: Path
    records: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)
    crash: list[str] = field(default_factory=list)
    valid_bytes: int = 0
    torn_bytes: int = 0
    torn_sha256: str = ""
    head_file_seq: int | None = None

    @property
    def tampered(self) -> bool:
        return bool(self.problems)

    @property
    def crashed(self) -> bool:
        """Not tampered, but left by a crash mid-append (recoverable)."""
        return not self.problems and bool(self.crash)

    @property
    def ok(self) -> bool:
        """Clean: neither tampered nor left mid-append by a crash."""
        return not self.problems and not self.crash

    @property
    def verdict(self) -> str:
        """``OK``, ``CRASH`` (recoverable, not tampering) or ``TAMPERED``."""
        return "TAMPERED" if self.problems else "CRASH" if self.crash else "OK"


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def verify(path: str | Path, expected_head: Head | None = None, check_head_file: bool = True) -> VerifyReport:
    """Check every line of the log at ``path`` (its hash, its ``seq``, its link to the line before) and the head
    file, telling what a crash of the writer leaves from tampering.

    CRASH (a kill or power cut at any point of an append): a torn last line (bytes after the last newline, or a last
    line that is not JSON and not yet in the head), and/or the head file naming a pending record that the log has
    whole or not at all. TAMPERED: any bad line before that; a line that is JSON but does not chain; a head file
    ahead of the log, or behind it by more than its pending record; a log that does not contain ``expected_head``.

    Args:
        path: The log. A missing file is an empty log.
        expected_head: A head kept elsewhere; the log must contain it (it may lag, as it is written after the log).
        check_head_file: Also check the log against the head file ``<log>.head`` (when that exists).

    Returns:
        The report: ``verdict`` is OK, CRASH (``crash`` says what) or TAMPERED (``problems`` say what and where).
    """
    path = Path(path)
    report = VerifyReport(path)
    data = path.read_bytes() if path.exists() else b""
    cut = data.rfind(b"\n") + 1
    lines, tail = (data[:cut].split(b"\n")[:-1] if cut else []), data[cut:]
    file_head: Head | None = None
    pending: str | None = None
    legacy = False
    batch: list[str] = []
    hp = head_path(path)
    if check_head_file and hp.exists():
        try:
            file_head, pending, legacy, batch = _read_head_file(hp)
            report.head_file_seq = file_head.seq
        except (ValueError, KeyError, TypeError) as e:
            report.problems.append(f"{hp}: unreadable head file ({e})")
    if batch and file_head is not None:
        # A batch was being appended: beyond the head, the whole records of a prefix of the batch, then (a kill
        # mid-write, or a power cut's block of zeros) bytes that are torn; a JSON line not of the batch is tampering.
        for i in range(file_head.seq, min(len(lines), file_head.seq + len(batch))):
            rec = _parse(lines[i])
            if rec is None:
                tail = b"\n".join(lines[i:]) + b"\n" + tail
                del lines[i:]
                break
    # A last whole line that is not JSON and not yet in the head is a torn write too (a power cut can leave a block
    # of zeros before the newline); a JSON line that does not chain is never torn: someone wrote it.
    if lines and _parse(lines[-1]) is None and (file_head is None or file_head.seq < len(lines)):
        tail = lines.pop() + b"\n" + tail
    prev, seq, offset = GENESIS, 0, 0
    hashes: list[str] = []
    for i, raw in enumerate(lines, start=1):
        rec = _parse(raw)
        if rec is None:
            report.problems.append(f"line {i}: not a JSON record")
            break
        if rec.get("hash") != record_hash(rec):
            report.problems.append(f"line {i}: hash does not match its content (the line was edited)")
        if rec.get("seq") != seq + 1:
            report.problems.append(f"line {i}: seq {rec.get('seq')} follows {seq} (a line was removed or reordered)")
        if rec.get("prev") != prev:
            report.problems.append(f"line {i}: prev does not link to line {i - 1}'s hash (a line was removed, "
                                   "inserted or reordered)")
        prev = str(rec.get("hash"))
        hashes.append(prev)
        s = rec.get("seq")
        seq = s if isinstance(s, int) else seq + 1
        offset += len(raw) + 1
    n = len(lines)
    report.records, report.head, report.valid_bytes = n, prev, offset
    if tail:
        report.torn_bytes, report.torn_sha256 = len(tail), hashlib.sha256(tail).hexdigest()
        report.crash.append(f"line {n + 1}: a torn last line ({len(tail)} bytes at offset {offset}), left by a crash "
                            "mid-write")

    def _has(h: Head) -> bool:
        return h.seq == 0 or (h.seq <= len(hashes) and hashes[h.seq - 1] == h.hash)

    if file_head is not None:
        if file_head.seq > n:
            report.problems.append(f"{hp} says the log has {file_head.seq} records but it has {n} "
                                   "(lines were cut off the end)")
        elif not _has(file_head):
            report.problems.append(f"{hp}: record {file_head.seq} is not the one the head recorded")
        elif batch and file_head.seq < n <= file_head.seq + len(batch) and hashes[file_head.seq:] == batch[:n - file_head.seq]:
            report.crash.append(f"{hp} says {file_head.seq} records and the log has {n - file_head.seq} more, whole: "
                                "the first records of the batch the head names as pending (a crash mid-batch)")
        elif file_head.seq == n - 1 and (hashes[-1] == pending or legacy):
            # Killed after the pending record's line and before the head naming it (the older head format, with
            # no pending hash, is taken on trust here, as the older writer could leave this).
            report.crash.append(f"{hp} says {file_head.seq} records and the log has one more, whole: the record the "
                                "head names as pending (a crash between writing a record and its head)")
        elif file_head.seq < n:
            report.problems.append(f"{hp} says {file_head.seq} records but the log has {n} "
                                   "(lines were appended without the log's writer)")
        elif pending is not None and not report.crash:
            report.crash.append(f"{hp} names a pending record {file_head.seq + 1} that was never written (a crash "
                                "before writing it)")
    if expected_head is not None:
        if expected_head.seq > n:
            report.problems.append(f"expected head says the log has {expected_head.seq} records but it has {n} "
                                   "(lines were cut off the end)")
        elif not _has(expected_head):
            report.problems.append(f"expected head: record {expected_head.seq} is not the one the head recorded")
    return report


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log (call :func:`verify` first when it matters that they are genuine)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
