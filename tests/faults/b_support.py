"""What the disk and host fault cases add to :mod:`faultkit`: a read-only look into the coordinator's store, the
check that it is intact, and a disk that fills (a tmpfs, root only, skipped with the reason otherwise)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def assert_store_intact(state_dir: Path, killed_pids: tuple[int, ...] = ()) -> None:
    """SQLite's integrity check passes and no torn or staged file is left in the state dir.

    ``killed_pids``: processes SIGKILLed mid-run, whose hidden temp files (``.<name>.tmp-<pid>-<thread>``, never
    read: the rename that would publish one never happened) may remain; any other is a failed write left behind.
    """
    con = sqlite3.connect(f"file:{state_dir / 'coordinator.db'}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    debris = tuple(f".tmp-{pid}-" for pid in killed_pids)
    torn = [p for p in state_dir.rglob("*") if ".tmp-" in p.name and not (p.name.startswith(".") and any(
        d in p.name for d in debris))]
    staged = list((state_dir / "uploads" / "staging").glob("*")) if (state_dir / "uploads" / "staging").exists() else []
    assert not torn and not staged, (torn, staged)


def store_count(state_dir: Path, sql: str) -> int:
    """One number from the coordinator's store, read-only (0 while it does not exist yet)."""
    db = state_dir / "coordinator.db"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return int(con.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        con.close()


# -- a disk that fills ---------------------------------------------------------------------------------------------
def tmpfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a full disk is a small tmpfs mounted for the test: needs root (mount -t tmpfs)"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount are not installed"
    return None


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made if missing), always unmounted again (lazily if still busy)."""
    reason = tmpfs_unavailable()
    if reason:
        pytest.skip(reason)
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a filler file into ``directory`` until its filesystem has no byte left; returns it (delete it to give
    the space back)."""
    filler = directory / "filler.bin"
    block = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    f.write(block[:size])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process's whole group (it was started in a session of its own) and reap it."""
    import signal

    with contextlib.suppress(ProcessLookupError):  # a process group already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(15)
