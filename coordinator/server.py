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
from google.protobuf.message import DecodeError

from coordinator.admin.servicer import AdminServicer
from coordinator.basemodel import check_base_model
from coordinator.config import FederationConfig
from coordinator.errors import CoordinatorError, FederationStopped, OutOfRange
from coordinator.ingress.secagg_servicer import SecAggServicer
from coordinator.ingress.servicer import FederationServicer
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from fedcommon.durable import write_durable
from fedcommon.manifest import MANIFEST_NAME, Manifest, verify_model_dir
from protos.codec import HTTP2_OPTIONS, MAX_MESSAGE
from protos.fedbridge.v1 import admin_service_pb2_grpc as apb_grpc
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc
from protos.fedbridge.v1 import secagg_service_pb2_grpc as secagg_grpc
from strategies.fedsb import is_fedsb_name

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 120.0


class CoordinatorFailed(RuntimeError):
    """The round engine hit an error it cannot recover from by itself (details in the log)."""


class StartRefused(RuntimeError):
    """The coordinator refuses to start; the message names the setting or file and why."""


class CAKeyPresent(StartRefused):
    """The coordinator can read the federation CA's private key, so whoever runs it could issue any certificate."""


def check_tls_files(cfg: FederationConfig) -> None:
    """Each ``[tls]`` file exists and parses: one clear line naming the field, never a traceback at the handshake.

    Raises:
        StartRefused: Naming the field, the file and what is wrong with it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    for field_name, path, parse in (("tls.ca", cfg.tls.ca, x509.load_pem_x509_certificates),
                                    ("tls.cert", cfg.tls.cert, x509.load_pem_x509_certificates),
                                    ("tls.key", cfg.tls.key, lambda b: load_pem_private_key(b, password=None))):
        try:
            parse(Path(path).read_bytes())
        except OSError as e:
            raise StartRefused(f"field '{field_name}': {path}: cannot read it ({e.strerror})") from None
        except (ValueError, TypeError) as e:
            what = "a PEM private key" if field_name == "tls.key" else "PEM certificates"
            raise StartRefused(f"field '{field_name}': {path} does not hold {what} ({e})") from None


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


UINT64_SQL_MAX = (1 << 63) - 1  # SQLite integers are signed 64-bit: a uint64 above this cannot be stored or compared


def _out_of_range_field(msg: Any, prefix: str = "") -> str | None:
    """The first uint64 field (dotted path) of ``msg`` at or above 2**63, else None."""
    from google.protobuf.descriptor import FieldDescriptor as F

    for fd, value in msg.ListFields():
        name = f"{prefix}{fd.name}"
        repeated = fd.is_repeated
        if fd.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
            if any(v > UINT64_SQL_MAX for v in (value if repeated else [value])):
                return name
        elif fd.type == F.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                items = [v for v in value.values()] if hasattr(value, "values") else []
                subs = [v for v in items if hasattr(v, "ListFields")]
            else:
                subs = list(value) if repeated else [value]
            for sub in subs:
                found = _out_of_range_field(sub, f"{name}.")
                if found:
                    return found
    return None


class RequestGuard(grpc.aio.ServerInterceptor):
    """Parses every request itself, so a malformed one is refused with a specific status, never UNKNOWN.

    Left to grpc, a request that does not parse (or a servicer error it does not expect) ends as UNKNOWN with a
    traceback in the log. Here, for every method of every service: a body that is not the declared message is
    INVALID_ARGUMENT, and a uint64 field at or above 2**63 (which SQLite cannot hold) is OUT_OF_RANGE naming the
    field. In a client stream the same checks raise inside the servicer's iterator (the upload ingress audits them).
    """

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def checked(raw: bytes) -> Any:
            try:
                msg = parse(raw)
            except Exception:  # DecodeError, and anything else a hostile body makes the parser raise
                raise DecodeError(f"request of {method} is not a valid protobuf message") from None
            bad = _out_of_range_field(msg)
            if bad is not None:
                raise OutOfRange(f"{method}: field {bad!r} must be below 2**63")
            return msg

        async def refuse(context: grpc.aio.ServicerContext, e: Exception) -> None:
            status = getattr(e, "status", "INVALID_ARGUMENT")
            log.warning("[%s] refused %s: %s", method, status, e)
            await context.abort(getattr(grpc.StatusCode, status), str(e))

        if handler.request_streaming:
            def stream_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def behaviour(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                    try:
                        return await fn(request_iterator, context)
                    except (DecodeError, CoordinatorError) as e:  # raised by ``checked`` past the servicer
                        await refuse(context, e)
                return behaviour

            # Stream messages are parsed as the servicer reads them; ``checked`` raises there.
            if handler.stream_unary is not None:
                return handler._replace(request_deserializer=checked, stream_unary=stream_wrap(handler.stream_unary))
            return handler._replace(request_deserializer=checked)

        def unary_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request = checked(raw)
                except (DecodeError, CoordinatorError) as e:
                    await refuse(context, e)
                return await fn(request, context)
            return behaviour

        def unary_stream_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def behaviour(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request = checked(raw)
                except (DecodeError, CoordinatorError) as e:
                    await refuse(context, e)
                async for item in fn(request, context):
                    yield item
            return behaviour

        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=None, unary_unary=unary_wrap(handler.unary_unary))
        return handler._replace(request_deserializer=None, unary_stream=unary_stream_wrap(handler.unary_stream))


# gRPC server settings. Keepalive: a site's connection that died without a FIN (a cut link) is closed within ~15 s,
# which ends its upload stream (the bytes received stay committed) and frees the partial for the site's resume; left
# to TCP it would hold the stream, and refuse the resume as busy, for many minutes. The sites ping every 10 s during
# calls (site_agent/client.py); pings up to every 5 s are accepted, so they are never answered with GOAWAY.
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                  ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                  ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                  ("grpc.http2.min_ping_interval_without_data_ms", 5_000), *HTTP2_OPTIONS]


def build_server(cfg: FederationConfig, engine: RoundEngine) -> grpc.aio.Server:
    """The coordinator's gRPC server with every service and the request guard (not yet listening)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestGuard()]
    if cfg.record_inbound:  # outermost wrapper sees the raw bytes first
        interceptors.insert(0, InboundRecorder(cfg.record_inbound))
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    pb_grpc.add_FederationServiceServicer_to_server(FederationServicer(engine), server)
    apb_grpc.add_AdminServiceServicer_to_server(AdminServicer(engine), server)
    secagg_grpc.add_SecAggServiceServicer_to_server(SecAggServicer(engine), server)
    return server


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


def _listen_refused(cfg: FederationConfig) -> StartRefused:
    return StartRefused(f"field 'listen': cannot listen on {cfg.listen} (is another process using that port, or is "
                        "the address not one of this host's?)")


def probe_listen(cfg: FederationConfig) -> None:
    """Refuse at once a ``listen`` address that cannot be bound (a port another process listens on, an address not
    of this host), before the base model is hashed and loaded: the real bind comes last and checks again.

    The probe binds with SO_REUSEADDR as a listener would (a restarted coordinator's old connections in TIME_WAIT do
    not count) and without SO_REUSEPORT, so a port another process holds fails here even though gRPC itself would
    share it. Port 0 (any free port) is not probed.

    Raises:
        StartRefused: The address cannot be bound.
    """
    import socket

    host, _, port_text = cfg.listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    if not port_text.isdigit() or int(port_text) == 0:
        return  # a malformed address is the config loader's to report; port 0 always binds
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
    except OSError:
        raise _listen_refused(cfg) from None


async def serve(cfg: FederationConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until stopped (SIGTERM/SIGINT or ``stop``), or until done and drained if ``exit_when_done``."""
    probe_listen(cfg)
    # A base that no longer matches the manifest recorded in it (a changed or truncated weight file) is refused
    # before anything is served: sites would refuse its tasks, or train on a base the federation never pinned.
    recorded = Path(cfg.base_model) / MANIFEST_NAME
    manifest = (verify_model_dir(cfg.base_model, Manifest.load(recorded).sha256, pinned_by=f"its {MANIFEST_NAME}")
                if recorded.is_file() else Manifest.of_dir(cfg.base_model))
    # Target names and the chat template first: they need no weights, and a bad one is refused in seconds.
    template = await asyncio.to_thread(check_base_model, cfg)
    check_tls_files(cfg)
    refuse_ca_key(cfg)
    adapter = await asyncio.to_thread(init_adapter, cfg.base_model, cfg.lora, is_fedsb_name(cfg.strategy))
    store = Store(cfg.state_dir)
    store.sweep_uploads()
    engine = RoundEngine(cfg, store, manifest.sha256, adapter, template)
    server = build_server(cfg, engine)
    dashboard = None
    if cfg.dashboard.enabled:  # first, so a dashboard that cannot start stops the coordinator before it serves
        from coordinator.dashboard import start_dashboard

        dashboard = await start_dashboard(cfg.dashboard, engine, cfg.tls, cfg.state_dir)
    try:
        port = server.add_secure_port(cfg.listen, server_credentials(cfg))
    except RuntimeError:  # grpc's "Failed to bind": the port is taken (or the address is not this host's)
        if dashboard is not None:
            await dashboard.stop()
        store.close()
        raise _listen_refused(cfg) from None
    await server.start()
    try:
        await engine.start()
    except FederationStopped as e:  # the store says the federation ended in failure: report it and exit, no retry
        log.error("[Coordinator] %s", e)
        if dashboard is not None:
            await dashboard.stop()
        await server.stop(grace=0)
        store.close()
        raise
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
    if isinstance(engine.fatal, FederationStopped):
        raise engine.fatal
    if engine.fatal is not None:
        raise CoordinatorFailed(f"the round engine failed: {engine.fatal!r}; the state in {cfg.state_dir} is "
                                "consistent and a restart resumes from it") from engine.fatal
