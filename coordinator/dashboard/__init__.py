"""The coordinator's web dashboard and Prometheus ``/metrics``: FastAPI served by uvicorn on the coordinator's own
asyncio loop (next to grpc.aio), so every view reads the live engine and store.

Loopback by default. Any other address needs a token (``dashboard.token_env``: sent as ``Authorization: Bearer`` or
as the HttpOnly cookie the ``/login`` form sets; never in the URL, where it would land in browser history, proxy logs
and Referer headers) or admin client certificates (``dashboard.require_admin_cert``: HTTPS with the coordinator's
certificate, and a connection whose client certificate is not an enrolled, unrevoked ``admin`` one of the federation
CA is closed before any request is read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from uvicorn.protocols.http.h11_impl import H11Protocol

from coordinator.config import DashboardSpec, TlsSpec
from coordinator.dashboard.app import create_app
from coordinator.errors import PermissionDenied
from coordinator.rounds.engine import RoundEngine
from coordinator.trust.access import SiteGate
from coordinator.trust.pki import PKIError, peer_identity
from fedcommon.durable import write_durable

log = logging.getLogger(__name__)
PORT_FILE = "dashboard.port"


class DashboardError(RuntimeError):
    """The dashboard cannot start as configured (the message says which setting)."""


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the coordinator owns SIGTERM/SIGINT and stops the dashboard itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AdminCertProtocol(H11Protocol):
    """HTTP/1.1 over TLS that closes any connection whose client certificate is not an ``admin`` certificate, or
    is one the CRL revokes or the enrolment registry does not list (:attr:`gate`, set by :func:`start_dashboard`)."""

    gate: SiteGate | None = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def, override]
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        try:
            peer = peer_identity(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)) \
                if der else None
        except (PKIError, ValueError):
            peer = None
        role = peer.role if peer else ""
        if peer is None or role != "admin":
            log.warning("[Dashboard] refused a connection without an admin certificate (role %r)", role)
            transport.close()
            return
        if self.gate is not None:
            try:
                self.gate.require_admin(peer)
            except PermissionDenied as e:
                log.warning("[Dashboard] refused admin %r: %s", peer.name, e)
                transport.close()
                return
        super().connection_made(transport)


@dataclass
class Dashboard:
    """A running dashboard; :meth:`stop` shuts it down."""

    server: _Server
    task: asyncio.Task[None]
    port: int
    scheme: str

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 5)
        except asyncio.TimeoutError:
            self.task.cancel()


def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise DashboardError(f"dashboard.listen {listen!r}: cannot bind ({e})") from None
    sock.set_inheritable(True)
    return sock


async def start_dashboard(spec: DashboardSpec, engine: RoundEngine, tls: TlsSpec, state_dir: Path) -> Dashboard:
    """Serve the dashboard and ``/metrics``; write the port to ``state_dir/dashboard.port``.

    Raises:
        DashboardError: The token variable is unset, or the address cannot be bound.
    """
    token = ""
    if spec.token_env:
        token = os.environ.get(spec.token_env, "")
        if len(token) < 16:
            raise DashboardError(f"dashboard.token_env names ${spec.token_env}, which is unset or shorter than 16 "
                                 "characters; refusing to serve the dashboard without its token")
    sock = _bind(spec.listen)
    kwargs: dict[str, object] = {}
    if spec.require_admin_cert:
        protocol = type("GatedAdminCertProtocol", (AdminCertProtocol,), {"gate": engine.gate})
        kwargs = {"ssl_keyfile": str(tls.key), "ssl_certfile": str(tls.cert), "ssl_ca_certs": str(tls.ca),
                  "ssl_cert_reqs": ssl.CERT_REQUIRED, "http": protocol}
    config = uvicorn.Config(create_app(engine, token), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=1, **kwargs)  # type: ignore[arg-type]
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise DashboardError("the dashboard server exited during start-up")
        await asyncio.sleep(0.02)
    port = sock.getsockname()[1]
    write_durable(Path(state_dir) / PORT_FILE, f"{port}\n".encode())
    scheme = "https" if spec.require_admin_cert else "http"
    log.info("[Dashboard] serving %s://%s:%d/ (metrics at /metrics)%s", scheme, spec.listen.rpartition(":")[0], port,
             " with a bearer token" if token else "")
    return Dashboard(server, task, port, scheme)
