"""The fault proxy itself, against a plain TCP echo server on loopback: it forwards both ways, counts bytes, and
lands each fault at its byte offset."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from proxy import FaultProxy


@pytest.fixture()
def echo() -> Iterator[int]:
    """A TCP echo server on a free loopback port (each connection echoes until the peer closes or resets)."""
    lst = socket.create_server(("127.0.0.1", 0))
    lst.settimeout(0.1)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield lst.getsockname()[1]
    stop.set()
    lst.close()
    t.join(5)


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_forwards_both_ways_and_counts(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        data = bytes(range(256)) * 200
        assert _roundtrip(s, data) == data
        time.sleep(0.2)  # the down pump counts after its send
        assert px.sent == {"up": len(data), "down": len(data)} and px.connections == 1


@pytest.mark.parametrize("direction", ["up", "down"])
def test_reset_after_n_bytes_in_either_direction(echo: int, direction: str) -> None:
    with FaultProxy("127.0.0.1", echo) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        assert _roundtrip(s, b"x" * 1000) == b"x" * 1000  # before arming: untouched
        px.reset_after(direction, 500)
        with pytest.raises(ConnectionResetError):
            s.sendall(b"y" * 5000)
            got = b""
            while len(got) < 5000:
                chunk = s.recv(65536)
                if not chunk:  # a FIN instead of an RST would be a different fault
                    pytest.fail(f"clean close after {len(got)} bytes, not a reset")
                got += chunk
        assert px.resets == {"up": int(direction == "up"), "down": int(direction == "down")}
        assert px.armed() == 0
        # The next connection is forwarded normally.
        with socket.create_connection(("127.0.0.1", px.port), timeout=10) as s2:
            assert _roundtrip(s2, b"z" * 100) == b"z" * 100


def test_corrupts_exactly_one_byte_at_the_offset(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        px.corrupt_at("up", 1234)
        data = b"\x00" * 40000
        got = _roundtrip(s, data)
        assert len(got) == len(data) and [i for i, b in enumerate(got) if b] == [1234] and got[1234] == 0xFF
        assert px.corrupted == {"up": 1, "down": 0}


def test_throttle_limits_the_rate(echo: int) -> None:
    with FaultProxy("127.0.0.1", echo) as px, socket.create_connection(("127.0.0.1", px.port), timeout=10) as s:
        px.throttle("up", 20_000)
        t0 = time.monotonic()
        assert _roundtrip(s, b"t" * 10_000) == b"t" * 10_000
        assert time.monotonic() - t0 >= 0.45  # 10 kB at 20 kB/s
        px.clear()
        t0 = time.monotonic()
        _roundtrip(s, b"u" * 10_000)
        assert time.monotonic() - t0 < 0.45
