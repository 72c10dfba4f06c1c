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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # A full disk must not leave the torn temp file behind (it would hold the space and never be read), and
        # the error names the file meant, which a failed write() alone does not.
        tmp.unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a folder, making the entries created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` holding a secret (a private key): mode 0600 from the first byte, never overwriting, fsynced.

    ``O_CREAT | O_EXCL`` with mode 0o600 creates the file readable by its owner only, so there is no moment in which
    another user could open it (write-then-chmod leaves one); an existing file (or a planted link) is refused
    with :class:`FileExistsError` rather than overwritten or followed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
