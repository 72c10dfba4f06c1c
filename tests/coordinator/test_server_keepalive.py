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


def test_both_ends_open_the_http2_window_for_a_long_fat_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream may run ahead of the reader by several of the cross-border link's BDP (50 Mbit/s x 150 ms), on
    the coordinator's server and on the site's channel (bench/link.py measures what it is for)."""
    from protos import codec
    from site_agent import client as client_mod

    seen: dict[str, Any] = {}

    def spy(*args: Any, options: Any = None, **kw: Any) -> Any:
        seen.update(dict(options or []))
        raise _Built

    monkeypatch.setattr(grpc.aio, "server", spy)
    with pytest.raises(_Built):
        server_mod.build_server(SimpleNamespace(record_inbound=None), engine=None)  # type: ignore[arg-type]
    bdp = 50e6 / 8 * 0.150
    assert seen["grpc.http2.lookahead_bytes"] >= 4 * bdp and seen["grpc.http2.bdp_probe"] == 1
    seen.clear()
    def channel(target: str, creds: Any, options: Any = None) -> Any:
        seen.update(dict(options or []))
        raise _Built

    monkeypatch.setattr(client_mod.grpc, "secure_channel", channel)
    monkeypatch.setattr("fedcommon.certs.check_tls_files", lambda *a: None)
    monkeypatch.setattr(client_mod.grpc, "ssl_channel_credentials", lambda **kw: None)
    tls = SimpleNamespace(ca=SimpleNamespace(read_bytes=lambda: b""), key=SimpleNamespace(read_bytes=lambda: b""),
                          cert=SimpleNamespace(read_bytes=lambda: b""))
    with pytest.raises(_Built):
        client_mod.CoordinatorClient(SimpleNamespace(tls=tls, server_name="", coordinator="x:1"))  # type: ignore[arg-type]
    assert seen["grpc.http2.lookahead_bytes"] == codec.HTTP2_WINDOW_BYTES >= 4 * bdp
    assert seen["grpc.http2.bdp_probe"] == 1
