"""What the network, disk, certificate and host fault cases share: one small federation, its fault-free reference,
the ledger check, and the root-only tools (a tmpfs that can be filled, namespaces) with a clear skip reason.

Until the suite's shared fixtures (``reference``, ``assert_each_update_once``) are in ``tests/faults/conftest.py``,
these are the same names, so the cases switch over by deleting the imports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from coordinator.rounds.store import Store
from fedcommon.auditlog import read_records
from sandbox import localfed

SITES = ["site-a", "site-b"]
FED_ID = "faults"


def prepare(root: Path, base: Path, **kw: Any) -> localfed.LocalFederation:
    """The cheapest real federation: 2 sites, 1 round, 2 local steps, rank 2, no evaluation."""
    return localfed.prepare(root, base, n_sites=len(SITES), rounds=kw.pop("rounds", 1), federation_id=FED_ID,
                            training={"max_steps": 2, "batch_size": 4, "learning_rate": 3e-3, "max_length": 48},
                            lora={"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
                            n_train=8, n_heldout=4, **kw)


def published(fed: localfed.LocalFederation) -> dict[str, torch.Tensor]:
    versions = sorted((fed.registry_dir / FED_ID).glob("v*"))
    assert [v.name for v in versions] == ["v1"], versions
    return load_file(str(versions[0] / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The published adapter of the fault-free run of :func:`prepare`'s federation."""
    fed = prepare(tmp_path_factory.mktemp("reference"), tiny_model_dir)
    with fed:
        codes = fed.run_all(timeout=400)
    assert codes == {**dict.fromkeys(SITES, 0), "coordinator": 0}, fed.diagnostics()
    return published(fed)


def assert_each_update_once(fed: localfed.LocalFederation, rounds: int = 1) -> None:
    """Every (round, site) accepted exactly once in the store and in the audit log, each round closed and made of
    exactly those updates; one publication."""
    store = Store(fed.state_dir)
    try:
        keys = [(u.round, u.site) for u in store.updates()]
        assert sorted(keys) == [(r, s) for r in range(1, rounds + 1) for s in SITES], keys
        rows = store.rounds()
        assert [r.state for r in rows] == ["closed"] * rounds, [(r.round, r.state) for r in rows]
        for r in rows:
            assert sorted(r.info["updates"]) == SITES, (r.round, r.info["updates"])
        assert [p["version"] for p in store.publications()] == [1]
    finally:
        store.close()
    accepted = Counter((r["fields"]["round"], r["fields"]["site"]) for r in read_records(fed.state_dir / "audit.jsonl")
                       if r["event"] == "update_accepted")
    assert all(n == 1 for n in accepted.values()), accepted


def assert_store_intact(state_dir: Path) -> None:
    """SQLite's integrity check passes and no torn or staged file is left in the state dir."""
    con = sqlite3.connect(f"file:{state_dir / 'coordinator.db'}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    torn = [p for p in state_dir.rglob("*") if ".tmp-" in p.name]
    staged = list((state_dir / "uploads" / "staging").glob("*")) if (state_dir / "uploads" / "staging").exists() else []
    assert not torn and not staged, (torn, staged)


def wait_until(what: str, cond: Callable[[], bool], fed: localfed.LocalFederation, timeout: float) -> None:
    """Poll ``cond`` until true; fail naming ``what`` (with the logs) on timeout or when a process exits early."""
    deadline = time.monotonic() + timeout
    while not cond():
        for name, p in fed.procs.items():
            assert p.poll() is None, f"{name} exited {p.returncode} while waiting for {what}:\n{fed.diagnostics()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s\n{fed.diagnostics(('coordinator', *SITES))}"
        time.sleep(0.1)


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


def log_text(fed: localfed.LocalFederation, name: str) -> str:
    try:
        return fed.log_path(name).read_text(errors="replace")
    except OSError:
        return ""


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
