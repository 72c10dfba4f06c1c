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


class AuditLog:
    """A hash-chained log file open for appending (one writer process; thread-safe inside it).

    Args:
        path: The log file (created with its folder if missing).

    Raises:
        AuditError: The existing file does not verify (it is never appended to then, so nothing is hidden).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._drop_torn_tail()
        report = verify(self.path)
        if not report.ok:
            raise AuditError(f"{self.path}: the audit log does not verify, refusing to append to it: "
                             f"{report.problems[0]}")
        self.head = Head(report.records, report.head)

    def _drop_torn_tail(self) -> None:
        """A crash in the middle of a write leaves a last line without its newline: that record never completed."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("[AuditLog] %s: dropping a torn last line (%d bytes) left by a crash", self.path,
                        len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, event: str, fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append one record and fsync it (and the head file) before returning the record."""
        if not event or not isinstance(event, str) or len(event) > 64:
            raise AuditError("audit event must be a non-empty string of at most 64 characters")
        fields = dict(fields or {})
        _check_value("fields", fields)
        with self._lock:
            rec: dict[str, Any] = {"seq": self.head.seq + 1, "ts": _utc_now(), "event": event, "fields": fields,
                                   "prev": self.head.hash}
            rec["hash"] = record_hash(rec)
            line = _canonical(rec) + b"\n"
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.head = Head(rec["seq"], rec["hash"])
            hp = head_path(self.path)
            tmp = hp.with_name(hp.name + ".tmp")
            with open(tmp, "w") as f:
                f.write(self.head.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, hp)
        return rec

    def record(self, event: str, fields: Mapping[str, Any]) -> None:
        """The site's ``AuditSink`` protocol."""
        self.append(event, fields)


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``problems`` name the line number (1-based) and what is wrong."""

    path: Path
    records: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, expected_head: Head | None = None, check_head_file: bool = True) -> VerifyReport:
    """Check every line of the log at ``path``: its hash, its ``seq`` and its link to the line before.

    Args:
        path: The log. A missing file is an empty log.
        expected_head: A head kept elsewhere; the log must contain it as its last record.
        check_head_file: Also require the log to end at the head recorded in ``<log>.head`` (when that exists).

    Returns:
        The report; ``ok`` is False with one message per problem (edited, removed, reordered or cut-off lines).
    """
    path = Path(path)
    report = VerifyReport(path)
    if not path.exists():
        lines: list[bytes] = []
    else:
        lines = path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            report.problems.append(f"line {len(lines)}: no newline at the end (torn write or edit)")
    prev, seq = GENESIS, 0
    for i, raw in enumerate(lines, start=1):
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            report.problems.append(f"line {i}: not a JSON record ({e})")
            break
        if rec.get("hash") != record_hash(rec):
            report.problems.append(f"line {i}: hash does not match its content (the line was edited)")
        if rec.get("seq") != seq + 1:
            report.problems.append(f"line {i}: seq {rec.get('seq')} follows {seq} (a line was removed or reordered)")
        if rec.get("prev") != prev:
            report.problems.append(f"line {i}: prev does not link to line {i - 1}'s hash (a line was removed, "
                                   "inserted or reordered)")
        prev = str(rec.get("hash"))
        s = rec.get("seq")
        seq = s if isinstance(s, int) else seq + 1
    report.records, report.head = len(lines), prev
    heads: list[tuple[str, Head]] = []
    hp = head_path(path)
    if check_head_file and hp.exists():
        try:
            heads.append((str(hp), Head.parse(hp.read_text())))
        except (ValueError, KeyError) as e:
            report.problems.append(f"{hp}: unreadable head file ({e})")
    if expected_head is not None:
        heads.append(("expected head", expected_head))
    for where, h in heads:
        if h.seq > len(lines):
            report.problems.append(f"{where} says the log has {h.seq} records but it has {len(lines)} "
                                   "(lines were cut off the end)")
        elif h.seq > 0 and _hash_at(lines, h.seq) != h.hash:
            report.problems.append(f"{where}: record {h.seq} is not the one the head recorded")
        elif h.seq < len(lines) and where != "expected head":
            report.problems.append(f"{where} says {h.seq} records but the log has {len(lines)} "
                                   "(lines were appended without the log's writer)")
    return report


def _hash_at(lines: list[bytes], seq: int) -> str | None:
    try:
        return str(json.loads(lines[seq - 1]).get("hash"))
    except (ValueError, IndexError, AttributeError):
        return None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log (call :func:`verify` first when it matters that they are genuine)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
