"""``serve`` refuses a ``listen`` address it cannot bind before it hashes and loads the base model."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from coordinator.server import StartRefused, probe_listen


def _cfg(listen: str) -> SimpleNamespace:
    return SimpleNamespace(listen=listen)


def test_a_port_another_process_listens_on_is_refused_and_a_free_one_is_not() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        with pytest.raises(StartRefused, match=rf"field 'listen': cannot listen on 127\.0\.0\.1:{port} \(is another"):
            probe_listen(_cfg(f"127.0.0.1:{port}"))
    probe_listen(_cfg(f"127.0.0.1:{port}"))  # free again: the probe leaves nothing bound behind
    probe_listen(_cfg(f"127.0.0.1:{port}"))
    probe_listen(_cfg("127.0.0.1:0"))


def test_an_address_not_of_this_host_is_refused() -> None:
    with pytest.raises(StartRefused, match=r"cannot listen on 203\.0\.113\.7:50051"):
        probe_listen(_cfg("203.0.113.7:50051"))  # TEST-NET-3 (documentation): not a local address; nothing is sent
