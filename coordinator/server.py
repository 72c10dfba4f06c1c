"""Run the coordinator: a grpc.aio server with mutual TLS in front of the round engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from coordinator.admin.servicer import AdminServicer
from coordinator.basemodel import check_base_model
from coordinator.config import FederationConfig
from coordinator.ingress.secagg_servicer import SecAggServicer
from coordinator.ingress.servicer import FederationServicer
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from fedcommon.durable import write_durable
from fedcommon.manifest import Manifest
from protos.codec import MAX_MESSAGE
from protos.fedbridge.v1 import admin_service_pb2_grpc as apb_grpc
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc
from protos.fedbridge.v1 import secagg_service_pb2_grpc as secagg_grpc

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 120.0


class CoordinatorFailed(RuntimeError):
    """The round engine hit an error it cannot recover from by itself (details in the log)."""


class CAKeyPresent(RuntimeError):
    """The coordinator can read the federation CA's private key, so whoever runs it could issue any certificate."""


def refuse_ca_key(cfg: FederationConfig) -> None:
    """Refuse to serve where the CA key lies next to the coordinator's files (the CA lives in its own folder).

    Raises:
        CAKeyPresent: Naming the file.
    """
    from cryptography import x509

    from coordinator.trust.pki import find_ca_key

    dirs = [cfg.tls.ca.parent, cfg.tls.cert.parent, cfg.tls.key.parent, cfg.state_dir]
    dirs += [p.parent for p in (cfg.enrolment_registry, cfg.crl) if p is not None]
    found = find_ca_key(tuple(dirs), x509.load_pem_x509_certificate(cfg.tls.ca.read_bytes()))
    if found is not None:
        raise CAKeyPresent(f"{found}: the federation CA's private key is in a folder the coordinator reads; move it "
                           "to the CA folder (or offline) -- the coordinator needs only ca.pem, the CRL and its own key")


class InboundRecorder(grpc.aio.ServerInterceptor):
    """Appends the raw bytes of every inbound request message to a file (length-prefixed).

    A privacy audit tap: it shows exactly which bytes reached the coordinator, and the canary test reads it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _wrap(self, method: str, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        def record(raw: bytes) -> Any:
            with self._lock, open(self.path, "ab") as f:
                name = method.encode()
                f.write(len(name).to_bytes(2, "big") + name + len(raw).to_bytes(8, "big") + raw)
            return deserializer(raw) if deserializer else raw

        return record

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return handler._replace(request_deserializer=self._wrap(handler_call_details.method,
                                                                handler.request_deserializer))


def read_recording(path: Path) -> list[tuple[str, bytes]]:
    """Parse an :class:`InboundRecorder` file into ``(method, raw_bytes)`` pairs."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i:i + 2], "big")
        name = data[i + 2:i + 2 + n].decode()
        i += 2 + n
        m = int.from_bytes(data[i:i + 8], "big")
        out.append((name, data[i + 8:i + 8 + m]))
        i += 8 + m
    return out


def server_credentials(cfg: FederationConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(cfg.tls.key.read_bytes(), cfg.tls.cert.read_bytes())],
                                       root_certificates=cfg.tls.ca.read_bytes(), require_client_auth=True)


async def serve(cfg: FederationConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until stopped (SIGTERM/SIGINT or ``stop``), or until done and drained if ``exit_when_done``."""
    refuse_ca_key(cfg)
    manifest = Manifest.of_dir(cfg.base_model)
    # Target names and the chat template first: they need no weights, and a bad one is refused in seconds.
    template = await asyncio.to_thread(check_base_model, cfg)
    adapter = await asyncio.to_thread(init_adapter, cfg.base_model, cfg.lora)
    store = Store(cfg.state_dir)
    engine = RoundEngine(cfg, store, manifest.sha256, adapter, template)
    interceptors = [InboundRecorder(cfg.record_inbound)] if cfg.record_inbound else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
    pb_grpc.add_FederationServiceServicer_to_server(FederationServicer(engine), server)
    apb_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine), server)
    secagg_grpc.add_SecAggServiceServicer_to_server(SecAggServicer(engine), server)
    dashboard = None
    if cfg.dashboard.enabled:  # first, so a dashboard that cannot start stops the coordinator before it serves
        from coordinator.dashboard import start_dashboard

        dashboard = await start_dashboard(cfg.dashboard, engine, cfg.tls, cfg.state_dir)
    port = server.add_secure_port(cfg.listen, server_credentials(cfg))
    await server.start()
    await engine.start()
    host = cfg.listen.rsplit(":", 1)[0]
    write_durable(cfg.state_dir / "coordinator.port", f"{port}\n".encode())
    log.info("[Coordinator] federation=%s listening on %s:%d (mTLS) pid=%d", cfg.federation_id, host, port, os.getpid())

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not in the main thread
            loop.add_signal_handler(sig, stop.set)

    async def until_drained() -> None:
        await engine.finished.wait()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while not engine.drained() and loop.time() < deadline:  # noqa: ASYNC110 - polls the store, bounded
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # let the last responses go out
        stop.set()

    async def until_failed() -> None:
        await engine.failed.wait()
        stop.set()

    watchers = [asyncio.create_task(until_failed())]
    if cfg.exit_when_done:
        watchers.append(asyncio.create_task(until_drained()))
    await stop.wait()
    for w in watchers:
        w.cancel()
    if dashboard is not None:
        await dashboard.stop()
    await server.stop(grace=2)
    store.close()
    log.info("[Coordinator] federation=%s stopped", cfg.federation_id)
    if engine.fatal is not None:
        raise CoordinatorFailed(f"the round engine failed: {engine.fatal!r}; the state in {cfg.state_dir} is "
                                "consistent and a restart resumes from it") from engine.fatal
