"""The coordinator's durable state: SQLite in WAL mode plus content-addressed artifact files.

Every write that an acknowledgement depends on is committed (and its file fsynced) before the call returns, so a
crash at any point loses no accepted update and a restart resumes the same round.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcommon.certs import SITE_NAME
from fedcommon.durable import fsync_dir, write_durable

_UPDATES_SQL = """CREATE TABLE updates (
  round INTEGER NOT NULL, site TEXT NOT NULL, payload_sha256 TEXT NOT NULL, size INTEGER NOT NULL,
  num_examples INTEGER NOT NULL, nonce BLOB NOT NULL UNIQUE, envelope BLOB NOT NULL, signature BLOB NOT NULL,
  path TEXT NOT NULL, accepted_ms INTEGER NOT NULL, trained_round INTEGER NOT NULL, weight REAL NOT NULL DEFAULT 1.0,
  PRIMARY KEY (round, site, trained_round));"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (
  name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, agent_version TEXT, lora_rank INTEGER,
  joined_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, state TEXT NOT NULL, input_sha256 TEXT NOT NULL, output_sha256 TEXT,
  opened_ms INTEGER NOT NULL, closed_ms INTEGER, info TEXT, attempt INTEGER NOT NULL DEFAULT 1,
  attempt_opened_ms INTEGER);
""" + _UPDATES_SQL.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS") + """
CREATE TABLE IF NOT EXISTS metrics (
  round INTEGER NOT NULL, site TEXT NOT NULL, phase TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL,
  num_examples INTEGER NOT NULL, reported_ms INTEGER NOT NULL, PRIMARY KEY (round, site, phase, key));
CREATE TABLE IF NOT EXISTS publications (
  version INTEGER PRIMARY KEY, round INTEGER NOT NULL, path TEXT NOT NULL, manifest_sha256 TEXT NOT NULL,
  published_ms INTEGER NOT NULL);
"""

# Shared evaluation of each evaluated round's output and release decisions (publish or blocked, with the reason).
_SCHEMA += """
CREATE TABLE IF NOT EXISTS eval_runs (
  round INTEGER PRIMARY KEY, status TEXT NOT NULL, error TEXT NOT NULL, adapter_sha256 TEXT NOT NULL,
  seconds REAL NOT NULL, work_dir TEXT NOT NULL, primary_metrics TEXT NOT NULL, finished_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS eval_scores (
  round INTEGER NOT NULL, benchmark TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL, num_samples INTEGER NOT NULL,
  PRIMARY KEY (round, benchmark, key));
CREATE TABLE IF NOT EXISTS blocked_publications (
  id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
  decided_ms INTEGER NOT NULL);
"""

# Secure aggregation (coordinator/privacy/secagg.py): per round its stage and member sets, the sites' signed public keys,
# the encrypted shares it routes (opaque to the coordinator), and the shares revealed for unmasking. The masked
# inputs themselves are ordinary rows of `updates`. Shares are deleted once the round closed (see secagg_forget).
# `spent_nonces` keeps the envelope nonces of masked inputs deleted with an abandoned attempt: still never reusable.
_SCHEMA += """
CREATE TABLE IF NOT EXISTS secagg_rounds (
  round INTEGER PRIMARY KEY, stage TEXT NOT NULL, deadline_ms INTEGER NOT NULL, threshold INTEGER NOT NULL,
  members TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secagg_keys (
  round INTEGER NOT NULL, site TEXT NOT NULL, cert_pem BLOB NOT NULL, keys BLOB NOT NULL, signature BLOB NOT NULL,
  PRIMARY KEY (round, site));
CREATE TABLE IF NOT EXISTS secagg_shares (
  round INTEGER NOT NULL, from_site TEXT NOT NULL, to_site TEXT NOT NULL, ciphertext BLOB NOT NULL,
  PRIMARY KEY (round, from_site, to_site));
CREATE TABLE IF NOT EXISTS secagg_reveals (
  round INTEGER NOT NULL, from_site TEXT NOT NULL, about_site TEXT NOT NULL, kind TEXT NOT NULL, share BLOB NOT NULL,
  PRIMARY KEY (round, from_site, about_site));
CREATE TABLE IF NOT EXISTS spent_nonces (nonce BLOB PRIMARY KEY, round INTEGER NOT NULL);
"""

# Security (issue #5): sites revoked by name (effective at once, kept across restarts) and each site's region as its
# certificate / the enrolment registry states it.
_SCHEMA += """
CREATE TABLE IF NOT EXISTS revocations (
  name TEXT PRIMARY KEY, reason TEXT NOT NULL, actor TEXT NOT NULL, revoked_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS site_regions (name TEXT PRIMARY KEY, region TEXT NOT NULL);
"""

# Round decisions (quorum reached, deadline passed, site dropped, attempt abandoned, late update dropped/carried).
_SCHEMA += """
CREATE TABLE IF NOT EXISTS round_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, attempt INTEGER NOT NULL, event TEXT NOT NULL,
  site TEXT NOT NULL, detail TEXT NOT NULL, ms INTEGER NOT NULL);
"""

# State dirs made before rounds had attempts and updates had a trained round: add the columns; rebuild `updates`
# so its key admits a late update carried into the round its site also trains.
_MIGRATIONS = (
    ("rounds", "attempt", "ALTER TABLE rounds ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1"),
    ("rounds", "attempt_opened_ms", "ALTER TABLE rounds ADD COLUMN attempt_opened_ms INTEGER"),
    ("updates", "trained_round", """
ALTER TABLE updates RENAME TO updates_v1;
""" + _UPDATES_SQL + """
INSERT INTO updates SELECT round, site, payload_sha256, size, num_examples, nonce, envelope, signature, path,
  accepted_ms, round, 1.0 FROM updates_v1;
DROP TABLE updates_v1;"""),
)


# A site name (the certificate CN) becomes a file name here; anything else is refused before it reaches the disk.


def _safe_name(site: str) -> str:
    if not SITE_NAME.fullmatch(site):
        raise ValueError(f"site name {site[:80]!r} is not a valid site name (letters, digits, '_', '.', '-'; 1-64)")
    return site


class UpdateConflict(Exception):
    """The update could not be claimed: ``kind`` is ``"duplicate"`` (the site has one for the round), ``"nonce"``,
    ``"closed"`` (its round is no longer open) or ``"revoked"`` (its site is)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RoundRow:
    round: int
    state: str
    input_sha256: str
    output_sha256: str | None
    opened_ms: int
    closed_ms: int | None
    info: dict[str, Any]
    attempt: int = 1
    attempt_opened_ms: int = 0


def _round_row(r: tuple[Any, ...]) -> RoundRow:
    return RoundRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else {}, r[7], r[8])


@dataclass(frozen=True)
class UpdateRow:
    round: int
    site: str
    payload_sha256: str
    size: int
    num_examples: int
    nonce: bytes
    path: Path
    accepted_ms: int
    trained_round: int = 0  # the round whose global adapter the site trained on (< round: a late update)
    weight: float = 1.0  # staleness factor applied to num_examples in the aggregate (1.0 for a fresh update)

    @property
    def staleness(self) -> int:
        return self.round - self.trained_round


@dataclass(frozen=True)
class Claim:
    """One staged update to claim (:meth:`Store.claim_updates`): the row's values and the staging file."""

    round: int
    site: str
    payload_sha256: str
    size: int
    num_examples: int
    nonce: bytes
    envelope: bytes
    signature: bytes
    trained_round: int
    weight: float
    event: tuple[str, dict[str, Any]] | None
    staged: Path
    require_open: bool = False  # refuse when the round is no longer open or the site is revoked


class Store:
    """SQLite (WAL) + artifact folders under ``state_dir``. Thread-safe (one connection, one lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.artifacts = self.dir / "artifacts"
        self.uploads = self.dir / "uploads"
        for d in (self.dir, self.artifacts, self.uploads):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "coordinator.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def sweep_uploads(self) -> None:
        """At the coordinator's start (never from a second process while it runs): drop staging files (a crash
        between write and claim) and the partial uploads of rounds already closed."""
        shutil.rmtree(self.uploads / "staging", ignore_errors=True)
        closed = [r[0] for r in self._q("SELECT round FROM rounds WHERE state='closed'")]
        self.remove_partials(max(closed, default=0))

    def _migrate(self) -> None:
        with self._lock:
            for table, column, sql in _MIGRATIONS:
                if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.executescript(f"BEGIN IMMEDIATE; {sql}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- meta ---------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._q("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, value))

    # -- artifacts ----------------------------------------------------------------------------------------------
    def adapter_path(self, round: int) -> Path:
        """The global adapter that is the input of ``round`` (round 1's input is the initial adapter)."""
        return self.artifacts / "globals" / f"round-{round:05d}.safetensors"

    def put_adapter(self, round: int, data: bytes) -> Path:
        path = self.adapter_path(round)
        write_durable(path, data)
        return path

    def residual_path(self, round: int) -> Path:
        """The cumulative base-weight residual that is the input of ``round`` (FedEx-LoRA)."""
        return self.artifacts / "residuals" / f"round-{round:05d}.safetensors"

    def put_residual(self, round: int, data: bytes) -> Path:
        path = self.residual_path(round)
        write_durable(path, data)
        return path

    def server_state_path(self, round: int) -> Path:
        return self.artifacts / "server_state" / f"round-{round:05d}.safetensors"

    def put_server_state(self, round: int, rule: str, flat: dict[str, torch.Tensor]) -> None:
        """Store a strategy's server optimizer state after ``round`` (before the round is marked closed)."""
        from safetensors.torch import save

        write_durable(self.server_state_path(round), save(dict(flat), metadata={"rule": rule}))

    def get_server_state(self, round: int) -> tuple[str, dict[str, torch.Tensor]] | None:
        path = self.server_state_path(round)
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            rule = (f.metadata() or {}).get("rule", "")
            return rule, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

    def update_path(self, round: int, site: str) -> Path:
        return self.artifacts / "updates" / f"round-{round:05d}" / f"{_safe_name(site)}.safetensors"

    def late_update_path(self, round: int, site: str, trained_round: int) -> Path:
        return (self.artifacts / "updates" / f"round-{round:05d}"
                / f"{_safe_name(site)}-late-from-{trained_round:05d}.safetensors")

    def partial_path(self, round: int, site: str, payload_sha256: str) -> Path:
        return self.uploads / f"round-{round:05d}" / f"{_safe_name(site)}-{payload_sha256}.part"

    def partials_of(self, site: str) -> list[Path]:
        """Every partial upload file of ``site``, in any round."""
        return sorted(self.uploads.glob(f"round-*/{_safe_name(site)}-*.part"))

    def remove_partials(self, up_to_round: int) -> None:
        """Delete the partial uploads of rounds 1..``up_to_round`` (closed: nothing resumes into them any more).
        Late uploads into a closed round are caught by the next close."""
        for d in self.uploads.glob("round-*"):
            suffix = d.name.removeprefix("round-")
            if suffix.isdigit() and int(suffix) <= up_to_round:
                shutil.rmtree(d, ignore_errors=True)

    # -- sites --------------------------------------------------------------------------------------------------
    def upsert_site(self, name: str, fingerprint: str, agent_version: str, lora_rank: int) -> None:
        t = now_ms()
        with self.tx() as db:
            db.execute("INSERT INTO sites(name, fingerprint, agent_version, lora_rank, joined_ms, last_seen_ms) "
                       "VALUES(?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET fingerprint=excluded.fingerprint, "
                       "agent_version=excluded.agent_version, lora_rank=excluded.lora_rank, last_seen_ms=excluded.last_seen_ms",
                       (name, fingerprint, agent_version, lora_rank, t, t))

    def sites(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT name, fingerprint, agent_version, lora_rank, joined_ms, last_seen_ms FROM sites ORDER BY name")
        keys = ("name", "fingerprint", "agent_version", "lora_rank", "joined_ms", "last_seen_ms")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # -- rounds -------------------------------------------------------------------------------------------------
    def open_round(self, round: int, input_sha256: str) -> None:
        t = now_ms()
        with self.tx() as db:
            db.execute("INSERT INTO rounds(round, state, input_sha256, opened_ms, attempt, attempt_opened_ms) "
                       "VALUES(?, 'open', ?, ?, 1, ?)", (round, input_sha256, t, t))

    def mark_closing(self, round: int, attempt: int, event: str, detail: dict[str, Any]) -> None:
        """Record the decision to close ``round`` and stop it taking updates, in one transaction: a restart
        aggregates exactly the updates held now."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET state='closing' WHERE round=? AND state='open'", (round,))
            self._event(db, round, attempt, event, "", detail)

    def retry_round(self, round: int, attempt: int, detail: dict[str, Any]) -> int:
        """Abandon ``attempt`` of ``round`` (recorded) and open the next attempt with a fresh deadline."""
        with self.tx() as db:
            self._event(db, round, attempt, "round_abandoned", "", detail)
            db.execute("UPDATE rounds SET attempt=?, attempt_opened_ms=? WHERE round=? AND attempt=?",
                       (attempt + 1, now_ms(), round, attempt))
        return attempt + 1

    def close_round(self, round: int, output_sha256: str, info: dict[str, Any]) -> None:
        """Close ``round`` with its output. Its routed and revealed SecAgg shares go in the same transaction: once a
        round reads as closed, no share that could unmask one of its inputs is left (nor after a crash)."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET state='closed', output_sha256=?, closed_ms=?, info=? WHERE round=?",
                       (output_sha256, now_ms(), json.dumps(info, sort_keys=True), round))
            for table in ("secagg_shares", "secagg_reveals"):
                db.execute(f"DELETE FROM {table} WHERE round=?", (round,))
        self.remove_partials(round)

    _ROUND_COLS = ("round, state, input_sha256, output_sha256, opened_ms, closed_ms, info, attempt, "
                   "COALESCE(attempt_opened_ms, opened_ms)")

    def rounds(self) -> list[RoundRow]:
        return [_round_row(r) for r in self._q(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round")]

    def opened_ms(self, round: int) -> int | None:
        """When ``round`` first opened (ms since the epoch), or None for a round not opened; one row's column (every
        upload's envelope is checked against it, more than once)."""
        rows = self._q("SELECT opened_ms FROM rounds WHERE round=?", (round,))
        return int(rows[0][0]) if rows else None

    def current_round(self) -> RoundRow | None:
        """The latest round. One row, not every round: each site's long poll asks on every change of state (found
        by ``bench/load.py``: with 200 sites, decoding every closed round's info here took a fifth of the event
        loop's time)."""
        rows = self._q(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round DESC LIMIT 1")
        return _round_row(rows[0]) if rows else None

    # -- round decisions ----------------------------------------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, round: int, attempt: int, event: str, site: str,
               detail: dict[str, Any]) -> None:
        db.execute("INSERT INTO round_events(round, attempt, event, site, detail, ms) VALUES(?,?,?,?,?,?)",
                   (round, attempt, event, site, json.dumps(detail, sort_keys=True), now_ms()))

    def add_event(self, round: int, attempt: int, event: str, site: str = "", detail: dict[str, Any] | None = None
                  ) -> None:
        """Record one round decision (quorum/deadline close, site dropped, late update dropped or carried...)."""
        with self.tx() as db:
            self._event(db, round, attempt, event, site, detail or {})

    def events(self, round: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, round, attempt, event, site, detail, ms FROM round_events"
        rows = self._q(sql + " WHERE round=? ORDER BY id", (round,)) if round is not None else self._q(sql + " ORDER BY id")
        keys = ("id", "round", "attempt", "event", "site", "detail", "ms")
        return [{**dict(zip(keys, r, strict=True)), "detail": json.loads(r[5])} for r in rows]

    # -- updates ------------------------------------------------------------------------------------------------
    def accept_update(self, *, round: int, site: str, payload: bytes, payload_sha256: str, num_examples: int,
                      nonce: bytes, envelope: bytes, signature: bytes, trained_round: int | None = None,
                      weight: float = 1.0, event: tuple[str, dict[str, Any]] | None = None) -> UpdateRow:
        """Claim the site's one update of ``trained_round`` and store it: file first, then the row.

        The payload goes to a staging file of its own (:meth:`stage_payload`), and only inside the transaction
        that finds no update of ``site`` for ``trained_round`` (and no use of ``nonce``) is it renamed into place and
        the row inserted (:meth:`claim_updates`). So two concurrent uploads of one site for one round can never
        overwrite the other's accepted file: the second is refused with :class:`UpdateConflict` and its bytes are
        dropped. A crash leaves at most an unreferenced file; a row never points at a missing file.

        ``trained_round`` (default ``round``) is the round the site trained on; a late update carried into a later
        ``round`` has ``weight`` < 1 and is stored with ``event`` (recorded in the same transaction).

        Raises:
            UpdateConflict: The site already has an update for ``trained_round``, or ``nonce`` was used.
        """
        staged = self.stage_payload(payload)
        claim = Claim(round=round, site=site, payload_sha256=payload_sha256, size=len(payload),
                      num_examples=num_examples, nonce=nonce, envelope=envelope, signature=signature,
                      trained_round=round if trained_round is None else trained_round, weight=weight, event=event,
                      staged=staged)
        try:
            got = self.claim_updates([claim])[0]
        finally:
            staged.unlink(missing_ok=True)  # refused: its bytes are dropped
        if isinstance(got, UpdateConflict):
            raise got
        return got

    def stage_payload(self, payload: bytes) -> Path:
        """Write ``payload`` to a fresh staging file (its own name, so concurrent callers never share one) and fsync
        it, for :meth:`claim_updates` to rename into place; safe from any thread, touches no round state.

        The staging folder itself is not fsynced: the entry that must survive is the one the claim renames into
        the updates folder (fsynced there, before the row commits); a staging file left by a crash is garbage either
        way, dropped by :meth:`sweep_uploads`.
        """
        staging = self.uploads / "staging" / f"{uuid.uuid4().hex}.safetensors"
        staging.parent.mkdir(parents=True, exist_ok=True)
        with open(staging, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        return staging

    def claim_updates(self, claims: list[Claim]) -> list[UpdateRow | UpdateConflict]:
        """Claim several staged updates in one transaction (a group commit): one fsync per updates folder and one
        SQLite commit for all of them, instead of two per update.

        Each claim is decided on its own, in order (a later claim sees the earlier ones of the same batch): it is
        refused with an :class:`UpdateConflict` in its slot of the result when its site already has an update for
        its trained round or its nonce was used, and, when ``require_open`` is set, when its target round is no
        longer ``open`` (``"closed"``: the decision to close it is committed; the caller checks the envelope again)
        or its site is revoked (``"revoked"``), or when its staged file is gone (``"gone"``: removed meanwhile). A
        claimed file is renamed into place; a refused one is left where it is, for the caller (which may try again).
        The staged file may be any fsynced file on this file system (the ingress passes the complete partial upload
        itself, so an update's bytes are written once).
        """
        out: list[UpdateRow | UpdateConflict] = []
        t = now_ms()
        with self.tx() as db:
            placed: list[tuple[Claim, Path]] = []
            for c in claims:
                path = (self.update_path(c.round, c.site) if c.trained_round == c.round
                        else self.late_update_path(c.round, c.site, c.trained_round))
                conflict = self._claim_conflict(db, c)
                if conflict is not None:
                    out.append(conflict)
                    continue
                # No row names ``path`` (the claim above), so nothing accepted is replaced here.
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(c.staged, path)
                except FileNotFoundError:
                    out.append(UpdateConflict("the uploaded file was removed while it was claimed", "gone"))
                    continue
                placed.append((c, path))
                db.execute("INSERT INTO updates(round, site, payload_sha256, size, num_examples, nonce, envelope, "
                           "signature, path, accepted_ms, trained_round, weight) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                           (c.round, c.site, c.payload_sha256, c.size, c.num_examples, c.nonce, c.envelope,
                            c.signature, str(path.relative_to(self.dir)), t, c.trained_round, float(c.weight)))
                if c.event is not None:
                    attempt = db.execute("SELECT attempt FROM rounds WHERE round=?", (c.round,)).fetchone()
                    self._event(db, c.round, attempt[0] if attempt else 1, c.event[0], c.site, c.event[1])
                out.append(UpdateRow(c.round, c.site, c.payload_sha256, c.size, c.num_examples, c.nonce, path, t,
                                     c.trained_round, c.weight))
            # The renames are durable before the rows that name them commit: a row never points at nothing.
            for folder in {p.parent for _, p in placed}:
                fsync_dir(folder)
        return out

    @staticmethod
    def _claim_conflict(db: sqlite3.Connection, c: Claim) -> UpdateConflict | None:
        if c.require_open:
            state = db.execute("SELECT state FROM rounds WHERE round=?", (c.round,)).fetchone()
            if state is None or state[0] != "open":
                return UpdateConflict(f"round {c.round} is no longer open", "closed")
            if db.execute("SELECT 1 FROM revocations WHERE name=?", (c.site,)).fetchone():
                return UpdateConflict(f"site {c.site!r} is revoked", "revoked")
        if db.execute("SELECT 1 FROM updates WHERE site=? AND trained_round=?", (c.site, c.trained_round)).fetchone():
            return UpdateConflict(f"site {c.site!r} already has an accepted update for round {c.trained_round}",
                                  "duplicate")
        if db.execute("SELECT 1 FROM updates WHERE nonce=?", (c.nonce,)).fetchone():
            return UpdateConflict("envelope nonce was already used (replay)", "nonce")
        return None

    _UPDATE_COLS = "round, site, payload_sha256, size, num_examples, nonce, path, accepted_ms, trained_round, weight"

    def _update_rows(self, where: str, args: tuple[Any, ...]) -> list[UpdateRow]:
        rows = self._q(f"SELECT {self._UPDATE_COLS} FROM updates {where} ORDER BY round, trained_round DESC, site", args)
        return [UpdateRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), self.dir / r[6], r[7], r[8], r[9]) for r in rows]

    def updates(self, round: int | None = None) -> list[UpdateRow]:
        """Updates aggregated into ``round`` (fresh ones first, then late ones carried in), or all of them."""
        return self._update_rows("WHERE round=?", (round,)) if round is not None else self._update_rows("", ())

    def update_trained_on(self, site: str, trained_round: int) -> UpdateRow | None:
        """The update ``site`` trained on round ``trained_round``'s input, wherever it was aggregated."""
        rows = self._update_rows("WHERE site=? AND trained_round=?", (site, trained_round))
        return rows[0] if rows else None

    def nonce_seen(self, nonce: bytes) -> bool:
        return bool(self._q("SELECT 1 FROM updates WHERE nonce=? UNION ALL SELECT 1 FROM spent_nonces WHERE nonce=?",
                            (nonce, nonce)))

    # -- metrics ------------------------------------------------------------------------------------------------
    def put_metrics(self, round: int, site: str, phase: str, metrics: dict[str, float], num_examples: int) -> None:
        t = now_ms()
        with self.tx() as db:
            db.executemany("INSERT INTO metrics(round, site, phase, key, value, num_examples, reported_ms) "
                           "VALUES(?,?,?,?,?,?,?) ON CONFLICT(round, site, phase, key) DO UPDATE SET "
                           "value=excluded.value, num_examples=excluded.num_examples, reported_ms=excluded.reported_ms",
                           [(round, site, phase, k, float(v), num_examples, t) for k, v in sorted(metrics.items())])

    def metrics(self, round: int | None = None) -> list[tuple[int, str, str, str, float, int]]:
        sql = "SELECT round, site, phase, key, value, num_examples FROM metrics"
        if round is None:
            return [tuple(r) for r in self._q(sql + " ORDER BY round, site, phase, key")]  # type: ignore[misc]
        return [tuple(r) for r in self._q(sql + " WHERE round=? ORDER BY site, phase, key", (round,))]  # type: ignore[misc]

    # -- publications -------------------------------------------------------------------------------------------
    def add_publication(self, version: int, round: int, path: Path, manifest_sha256: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO publications(version, round, path, manifest_sha256, published_ms) VALUES(?,?,?,?,?)",
                       (version, round, str(path), manifest_sha256, now_ms()))

    def publications(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT version, round, path, manifest_sha256, published_ms FROM publications ORDER BY version")
        return [dict(zip(("version", "round", "path", "manifest_sha256", "published_ms"), r, strict=True)) for r in rows]

    # -- shared evaluation --------------------------------------------------------------------------------------
    def put_eval_run(self, round: int, *, status: str, error: str, adapter_sha256: str, seconds: float, work_dir: Path,
                     scores: dict[str, dict[str, tuple[float, int]]], primary_metrics: dict[str, str]) -> None:
        """Record one evaluation of round ``round``'s output: ``scores[benchmark][key] = (value, num_samples)``;
        key ``score`` is the value of the benchmark's primary metric, named in ``primary_metrics[benchmark]``."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO eval_runs(round, status, error, adapter_sha256, seconds, work_dir, "
                       "primary_metrics, finished_ms) VALUES(?,?,?,?,?,?,?,?)",
                       (round, status, error, adapter_sha256, float(seconds), str(work_dir),
                        json.dumps(primary_metrics, sort_keys=True), now_ms()))
            db.execute("DELETE FROM eval_scores WHERE round=?", (round,))
            db.executemany("INSERT INTO eval_scores(round, benchmark, key, value, num_samples) VALUES(?,?,?,?,?)",
                           [(round, b, k, float(v), int(n)) for b, kv in sorted(scores.items())
                            for k, (v, n) in sorted(kv.items())])

    def eval_runs(self) -> list[dict[str, Any]]:
        keys = ("round", "status", "error", "adapter_sha256", "seconds", "work_dir", "primary_metrics", "finished_ms")
        rows = self._q(f"SELECT {', '.join(keys)} FROM eval_runs ORDER BY round")
        out = [dict(zip(keys, r, strict=True)) for r in rows]
        for r in out:
            r["primary_metrics"] = json.loads(r["primary_metrics"])
        return out

    def eval_run(self, round: int) -> dict[str, Any] | None:
        return next((r for r in self.eval_runs() if r["round"] == round), None)

    def eval_scores(self, round: int | None = None) -> dict[int, dict[str, dict[str, float]]]:
        """``{round: {benchmark: {key: value}}}``; key ``score`` is the benchmark's primary score."""
        sql = "SELECT round, benchmark, key, value FROM eval_scores"
        rows = self._q(sql + " WHERE round=?", (round,)) if round is not None else self._q(sql)
        out: dict[int, dict[str, dict[str, float]]] = {}
        for r, b, k, v in rows:
            out.setdefault(r, {}).setdefault(b, {})[k] = v
        return out

    # -- release decisions --------------------------------------------------------------------------------------
    def add_blocked_publication(self, round: int, reason: str, detail: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO blocked_publications(round, reason, detail, decided_ms) VALUES(?,?,?,?)",
                       (round, reason, json.dumps(detail, sort_keys=True), now_ms()))

    def blocked_publications(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT id, round, reason, detail, decided_ms FROM blocked_publications ORDER BY id")
        return [{"id": r[0], "round": r[1], "reason": r[2], "detail": json.loads(r[3]), "decided_ms": r[4]} for r in rows]

    def release_decided(self, round: int) -> bool:
        """A publication of round ``round``'s output was made or blocked."""
        return bool(self._q("SELECT 1 FROM publications WHERE round=? UNION ALL SELECT 1 FROM blocked_publications "
                            "WHERE round=?", (round, round)))

    # -- provenance ledger --------------------------------------------------------------------------------------
    def ledger(self) -> list[dict[str, Any]]:
        """Per accepted update: which round, site, payload hash and examples went into which global adapter.

        ``input_sha256`` is the global adapter the site trained from (for a late update carried into a later round:
        the input of ``trained_round``), ``output_sha256`` the global adapter the round's aggregation produced (None
        while the round is open). ``envelope`` is the signed envelope's bytes (it carries the site's reported epsilon);
        ``weight`` is the staleness factor of a late update (1.0 otherwise).
        """
        rows = self._q("SELECT u.round, u.site, u.payload_sha256, u.num_examples, u.size, u.envelope, t.input_sha256, "
                       "r.output_sha256, u.trained_round, u.weight FROM updates u JOIN rounds r ON r.round = u.round "
                       "JOIN rounds t ON t.round = u.trained_round ORDER BY u.round, u.trained_round DESC, u.site")
        keys = ("round", "site", "payload_sha256", "num_examples", "bytes", "envelope", "input_sha256", "output_sha256",
                "trained_round", "weight")
        return [dict(zip(keys, (*r[:5], bytes(r[5]), *r[6:]), strict=True)) for r in rows]

    # -- secure aggregation -------------------------------------------------------------------------------------
    def secagg_round(self, round: int) -> dict[str, Any] | None:
        """``{"stage", "deadline_ms", "threshold", "members": {stage: [sites]}}`` of ``round``, or None."""
        rows = self._q("SELECT stage, deadline_ms, threshold, members FROM secagg_rounds WHERE round=?", (round,))
        if not rows:
            return None
        stage, deadline, threshold, members = rows[0]
        return {"stage": stage, "deadline_ms": deadline, "threshold": threshold, "members": json.loads(members)}

    def secagg_set_round(self, round: int, stage: str, deadline_ms: int, threshold: int,
                         members: dict[str, list[str]]) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO secagg_rounds(round, stage, deadline_ms, threshold, members) VALUES(?,?,?,?,?) "
                       "ON CONFLICT(round) DO UPDATE SET stage=excluded.stage, deadline_ms=excluded.deadline_ms, "
                       "threshold=excluded.threshold, members=excluded.members",
                       (round, stage, deadline_ms, threshold, json.dumps(members, sort_keys=True)))

    def secagg_put_keys(self, round: int, site: str, cert_pem: bytes, keys: bytes, signature: bytes) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO secagg_keys(round, site, cert_pem, keys, signature) VALUES(?,?,?,?,?)",
                       (round, site, cert_pem, keys, signature))

    def secagg_keys(self, round: int) -> list[tuple[str, bytes, bytes, bytes]]:
        """``(site, cert_pem, keys, signature)`` per site that advertised keys for ``round``, by site name."""
        rows = self._q("SELECT site, cert_pem, keys, signature FROM secagg_keys WHERE round=? ORDER BY site", (round,))
        return [(r[0], bytes(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]

    def secagg_put_shares(self, round: int, from_site: str, shares: list[tuple[str, bytes]]) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM secagg_shares WHERE round=? AND from_site=?", (round, from_site))
            db.executemany("INSERT INTO secagg_shares(round, from_site, to_site, ciphertext) VALUES(?,?,?,?)",
                           [(round, from_site, to, ct) for to, ct in shares])

    def secagg_shares(self, round: int) -> list[tuple[str, str, bytes]]:
        """``(from_site, to_site, ciphertext)`` of ``round``."""
        rows = self._q("SELECT from_site, to_site, ciphertext FROM secagg_shares WHERE round=? ORDER BY from_site, "
                       "to_site", (round,))
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def secagg_put_reveals(self, round: int, from_site: str, reveals: list[tuple[str, str, bytes]]) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM secagg_reveals WHERE round=? AND from_site=?", (round, from_site))
            db.executemany("INSERT INTO secagg_reveals(round, from_site, about_site, kind, share) VALUES(?,?,?,?,?)",
                           [(round, from_site, about, kind, share) for about, kind, share in reveals])

    def secagg_reveals(self, round: int) -> list[tuple[str, str, str, bytes]]:
        """``(from_site, about_site, kind, share)`` revealed for unmasking ``round``."""
        rows = self._q("SELECT from_site, about_site, kind, share FROM secagg_reveals WHERE round=? ORDER BY "
                       "from_site, about_site", (round,))
        return [(r[0], r[1], r[2], bytes(r[3])) for r in rows]

    def secagg_restart(self, round: int, stage: str, deadline_ms: int, threshold: int,
                       members: dict[str, Any]) -> None:
        """Start a new SecAgg attempt of ``round`` in one transaction: its keys, shares, reveals and masked inputs go
        (they belong to the abandoned attempt's keys and can never be unmasked), their nonces are kept spent, the
        new stage state is written."""
        with self.tx() as db:
            # The masked inputs go, their nonces stay spent: a replayed envelope of this attempt is still a replay.
            db.execute("INSERT OR IGNORE INTO spent_nonces(nonce, round) SELECT nonce, round FROM updates WHERE round=?",
                       (round,))
            for table in ("secagg_keys", "secagg_shares", "secagg_reveals", "updates"):
                db.execute(f"DELETE FROM {table} WHERE round=?", (round,))
            db.execute("INSERT INTO secagg_rounds(round, stage, deadline_ms, threshold, members) VALUES(?,?,?,?,?) "
                       "ON CONFLICT(round) DO UPDATE SET stage=excluded.stage, deadline_ms=excluded.deadline_ms, "
                       "threshold=excluded.threshold, members=excluded.members",
                       (round, stage, deadline_ms, threshold, json.dumps(members, sort_keys=True)))

    def secagg_forget(self) -> None:
        """Delete routed and revealed shares of every closed round (the masked inputs stay, still masked)."""
        with self.tx() as db:
            for table in ("secagg_shares", "secagg_reveals"):
                db.execute(f"DELETE FROM {table} WHERE round IN (SELECT round FROM rounds WHERE state='closed')")

    # -- revocations and regions (issue #5) ---------------------------------------------------------------------
    def add_revocation(self, name: str, reason: str, actor: str) -> bool:
        """Record that ``name`` is revoked; returns False when it already was (the first record is kept)."""
        with self.tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO revocations(name, reason, actor, revoked_ms) VALUES(?,?,?,?)",
                             (name, reason, actor, now_ms()))
            return cur.rowcount == 1

    def revocations(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT name, reason, actor, revoked_ms FROM revocations ORDER BY revoked_ms, name")
        return [dict(zip(("name", "reason", "actor", "revoked_ms"), r, strict=True)) for r in rows]

    def set_site_region(self, name: str, region: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO site_regions(name, region) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET "
                       "region=excluded.region", (name, region))

    def site_regions(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self._q("SELECT name, region FROM site_regions ORDER BY name")}

    # -- differential privacy: each site's epsilon -------------------------------------------------------------
    def site_dp(self) -> dict[str, dict[str, float]]:
        """Per site, from its latest accepted signed envelope: cumulative ``epsilon``, its ``delta`` and ``round``.

        ``epsilon`` and ``delta`` are 0 when that update carried no DP noise (see ``UpdateEnvelope.epsilon_spent``).
        """
        from protos.fedbridge.v1 import federation_service_pb2 as pb

        out: dict[str, dict[str, float]] = {}
        # A site's latest update is the one trained last (a late update carried into a round precedes the site's
        # fresh update of that round).
        for rnd, site, raw in self._q("SELECT round, site, envelope FROM updates ORDER BY trained_round, round, site"):
            env = pb.UpdateEnvelope.FromString(bytes(raw))
            out[site] = {"epsilon": env.epsilon_spent, "delta": env.dp_delta, "round": rnd}
        return out

    def site_epsilon(self) -> dict[str, float]:
        """Each site's cumulative DP epsilon after its latest accepted update (0: no DP noise on it)."""
        return {site: v["epsilon"] for site, v in self.site_dp().items()}
