"""A full disk under a FederationService call is refused RESOURCE_EXHAUSTED with the pause to retry after in the
trailing metadata, and logged once naming the file; any other error is not turned into a refusal."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
from typing import Any

import grpc
import pytest

from coordinator.errors import StorageFull
from coordinator.ingress import servicer
from protos import codec


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, ...] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details, tuple(trailing_metadata))
        raise RuntimeError("aborted")


def _abort(err: Exception) -> _Context:
    ctx = _Context()
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(servicer._abort(ctx, "UploadUpdate", err))  # type: ignore[arg-type]
    return ctx


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/state/uploads/x.part"),
                                 OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
                                 sqlite3.OperationalError("database or disk is full")], ids=["enospc", "edquot", "sqlite"])
def test_full_disk_is_resource_exhausted_with_a_pause(err: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger=servicer.log.name):
        ctx = _abort(err)
    assert ctx.aborted is not None
    code, details, trailing = ctx.aborted
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "/state" not in details  # the site learns that the disk is full, not where
    assert trailing == ((codec.RETRY_AFTER_MS_KEY, str(StorageFull.retry_after_ms)),)
    lines = [r.getMessage() for r in caplog.records if "coordinator storage full" in r.getMessage()]
    assert len(lines) == 1
    if isinstance(err, OSError) and err.filename:
        assert "cannot write /state/uploads/x.part" in lines[0]


def test_other_errors_are_not_refusals() -> None:
    for err in (OSError(errno.EIO, "I/O error"), sqlite3.OperationalError("no such table: x")):
        with pytest.raises(type(err)):
            asyncio.run(servicer._abort(_Context(), "Join", err))  # type: ignore[arg-type]
