"""Crash-safe file writes: a reader sees the old content or the new, never a torn file, and the new survives power loss."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the folder.

    The temp name carries the process and thread id, so two writers of the same path never share a temp file; the
    last rename wins. The folder is fsynced because the rename itself lives in the folder's entry.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a folder, making the entries created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
