"""write_durable on a full disk: the old content stays, no torn temp file is left, and the error names the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fedcommon import durable


def test_full_disk_leaves_no_temp_file_and_names_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state" / "adapter.safetensors"
    durable.write_durable(target, b"old")

    def enospc(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable.os, "fsync", enospc)
    with pytest.raises(OSError) as info:
        durable.write_durable(target, b"new content")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter.safetensors"]
