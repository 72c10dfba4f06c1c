"""The coordinator's gRPC server closes dead site connections (keepalive) and accepts the sites' keepalive pings, so
a stream cut by a WAN outage ends (its bytes committed) and the site's resume is not refused as busy."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from coordinator import server as server_mod
from site_agent.client import KEEPALIVE_OPTIONS


class _Built(Exception):
    pass


def test_the_server_pings_silent_peers_and_accepts_the_sites_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def spy(*args: Any, options: Any = None, **kw: Any) -> Any:
        seen.update(dict(options or []))
        raise _Built

    monkeypatch.setattr(grpc.aio, "server", spy)
    with pytest.raises(_Built):
        server_mod.build_server(SimpleNamespace(record_inbound=None), engine=None)  # type: ignore[arg-type]
    assert seen["grpc.keepalive_time_ms"] <= 10_000 and seen["grpc.keepalive_timeout_ms"] <= 5_000
    site_ping_ms = dict(KEEPALIVE_OPTIONS)["grpc.keepalive_time_ms"]
    assert seen["grpc.http2.min_recv_ping_interval_without_data_ms"] < site_ping_ms  # never "too many pings"
    assert seen["grpc.max_receive_message_length"] >= 8 << 20
