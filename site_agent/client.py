"""The site's outbound gRPC client: mTLS, retries with back-off, resumable downloads and uploads."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TypeVar

import grpc

from protos import codec
from protos.codec import MAX_MESSAGE
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc
from site_agent.config import SiteConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.ABORTED}


# A dead connection (a cut WAN link, a vanished middlebox: no FIN, no RST) is found within ~15 s of a call's
# last answer instead of after the kernel's retransmission timeout (up to ~15 min): a ping every 10 s while calls are
# open, the connection dropped when one is not answered within 5 s. The call then fails UNAVAILABLE and the retry
# and resume below take over. The coordinator accepts pings this often (coordinator/server.py).
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 0), ("grpc.http2.max_pings_without_data", 0)]
# The longest pause between retries of a failed call. Short, because a failing call costs nothing on the wire while
# the channel is reconnecting (gRPC's own back-off, at most 2 s, paces the connection attempts), and every second
# waited after the link is back is a second of upload lost.
MAX_RETRY_DELAY_S = 1.0
MAX_ERROR_MESSAGE = 200  # what the coordinator takes in ReportError.message
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_PATH = re.compile(r"(?:[A-Za-z]:)?[\\/][^\s:,;]*|~[^\s:,;]*")
_ERROR_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")


def error_summary(exc: BaseException) -> tuple[str, str]:
    """``(class name, one sanitized line)`` of an exception, for ReportError: the first line of its message only
    (never the traceback), quoted text (which may be a sample or a value) replaced by ``'…'`` and paths by
    ``<path>``, control characters dropped, cut to fit. What is left names the failure, not the data."""
    name = type(exc).__name__
    name = name if _ERROR_TYPE.fullmatch(name) else "Exception"
    lines = str(exc).strip().splitlines()
    line = _PATH.sub("<path>", _QUOTED.sub("'…'", lines[0] if lines else ""))
    line = "".join(c for c in line if c.isprintable()).strip()
    return name, line if len(line) <= MAX_ERROR_MESSAGE else line[:MAX_ERROR_MESSAGE - 1] + "…"


def retry_after_s(e: grpc.RpcError) -> float | None:
    """The pause the coordinator asks for before the same call is retried (``RETRY_AFTER_MS_KEY`` in the trailing
    metadata: its disk is full), or ``None`` when the refusal says nothing of the kind."""
    try:
        md = e.trailing_metadata() or ()  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return None
    for key, value in md:
        if key == codec.RETRY_AFTER_MS_KEY:
            try:
                return min(max(int(value), 0), 60_000) / 1000
            except ValueError:
                return None
    return None


class LateUpdateRefused(RuntimeError):
    """The coordinator refused an update because its round closed (FAILED_PRECONDITION under the drop policy)."""


class Heartbeats:
    """Sends Heartbeat calls from a background thread while its block runs (``with client.heartbeats(...)``).

    The agent keeps one running for as long as it serves (loading the model, training, uploading, evaluating,
    waiting), so the coordinator marks it silent only when it is dead, frozen or cut off; :meth:`working` says what
    it is doing now. The first beat goes out at once; the coordinator's answer sets the interval. Failures are logged
    and never stop training: a coordinator that restarts simply sees the next beat. A coordinator without the RPC
    (UNIMPLEMENTED) is not asked again.
    """

    def __init__(self, client: CoordinatorClient, round: int, total_steps: int, phase: str = "train") -> None:
        self.client, self.round, self.total_steps, self.phase = client, round, total_steps, phase
        self.step = 0
        self.interval_s = 5.0
        self.round_open = True
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-r{round}", daemon=True)

    def working(self, round: int, phase: str, total_steps: int = 0) -> None:
        """What the site does now (e.g. ``train`` of round 3); the step count starts again at 0."""
        self.round, self.phase, self.total_steps, self.step, self.round_open = round, phase, total_steps, 0, True

    def progress(self, step: int, total: int | None = None, loss: float | None = None) -> None:
        """The trainer's per-step callback (same signature as the progress bar's ``update``)."""
        self.step = int(step)

    def _run(self) -> None:
        while not self._stop.is_set():
            req = pb.HeartbeatRequest(round=self.round, phase=self.phase, step=self.step, total_steps=self.total_steps)
            try:
                resp = self.client.stub.Heartbeat(req, timeout=10)
                self.sent += 1
                self.interval_s = max(0.2, resp.interval_ms / 1000) if resp.interval_ms else self.interval_s
                if self.round_open and not resp.round_open and self.phase == "train":
                    log.warning("[Site.Heartbeat] round=%d closed at the coordinator (now round %d); the update "
                                "will meet the federation's late-update policy", self.round, resp.current_round)
                self.round_open = resp.round_open
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                    log.info("[Site.Heartbeat] the coordinator takes no heartbeats; not sending more")
                    return
                log.info("[Site.Heartbeat] round=%d not delivered (%s)", self.round, e.code().name)  # type: ignore[attr-defined]
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():  # never started (Join failed first): nothing to join, and the real error stands
            self._thread.join(timeout=15)


class CoordinatorClient:
    """Talks to one coordinator over a mutually authenticated TLS channel."""

    def __init__(self, cfg: SiteConfig, chunk_size: int = codec.DEFAULT_CHUNK_SIZE) -> None:
        self.cfg = cfg
        self.chunk_size = chunk_size
        from fedcommon.certs import check_tls_files

        check_tls_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)  # a broken kit: one line naming the file, not a handshake
        creds = grpc.ssl_channel_credentials(root_certificates=cfg.tls.ca.read_bytes(),
                                             private_key=cfg.tls.key.read_bytes(),
                                             certificate_chain=cfg.tls.cert.read_bytes())
        options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
                   # A restarted coordinator is found within ~2 s: gRPC's own reconnect back-off otherwise grows to
                   # minutes while our retry loop keeps calling a channel that is not even trying to connect.
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000), *KEEPALIVE_OPTIONS, *codec.HTTP2_OPTIONS]
        if cfg.server_name:
            options.append(("grpc.ssl_target_name_override", cfg.server_name))
        self.channel = grpc.secure_channel(cfg.coordinator, creds, options=options)
        self.stub = pb_grpc.FederationServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def heartbeats(self, round: int, total_steps: int, phase: str = "train") -> Heartbeats:
        """A context manager that sends heartbeats for ``round`` while its block runs."""
        return Heartbeats(self, round, total_steps, phase)

    def report_error(self, round: int, phase: str, exc: BaseException) -> bool:
        """Tell the coordinator this site failed (one sanitized line, see :func:`error_summary`), once, briefly:
        a failing site must not hang on a coordinator that is gone. Returns whether it was delivered."""
        error_type, message = error_summary(exc)
        req = pb.ReportErrorRequest(round=round, phase=phase, error_type=error_type, message=message)
        try:
            self.stub.ReportError(req, timeout=5)
            return True
        except grpc.RpcError as e:
            log.info("[Site.ReportError] not delivered (%s)", e.code().name)  # type: ignore[attr-defined]
            return False

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.cfg.retry_for_s
        delay = 0.2
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                pause = retry_after_s(e)
                if (code not in RETRYABLE and pause is None) or time.monotonic() > deadline:
                    raise
                log.info("[Site.%s] coordinator %s (%s); retrying in %.1fs", what, code.name,
                         e.details(), pause or delay)  # type: ignore[attr-defined]
                time.sleep(pause or delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    def join(self, agent_version: str, lora_rank: int = 0) -> pb.JoinResponse:
        req = pb.JoinRequest(agent_version=agent_version, lora_rank=lora_rank, modes=["sft"])
        return self._retry("Join", lambda: self.stub.Join(req, timeout=30))

    def fetch_task(self, wait_ms: int) -> pb.FetchTaskResponse:
        req = pb.FetchTaskRequest(wait_ms=wait_ms)
        return self._retry("FetchTask", lambda: self.stub.FetchTask(req, timeout=wait_ms / 1000 + 30))

    def download_adapter(self, round: int, sha256: str, size: int,
                         artifact: pb.ArtifactKind = pb.ARTIFACT_KIND_GLOBAL_ADAPTER) -> bytes:
        """Fetch a round's artifact, resuming from the bytes already held after a broken stream."""
        buf = bytearray()

        def attempt() -> None:
            req = pb.DownloadAdapterRequest(round=round, offset=len(buf), artifact=artifact)
            for msg in self.stub.DownloadAdapter(req, timeout=120):
                if msg.offset != len(buf):
                    raise codec.CodecError(f"adapter chunk at offset {msg.offset}, expected {len(buf)}")
                buf.extend(msg.data)

        self._retry("DownloadAdapter", attempt)
        data = bytes(buf)
        if len(data) != size or codec.sha256_hex(data) != sha256:
            raise codec.CodecError(f"{pb.ArtifactKind.Name(artifact)} for round {round} does not match the task's "
                                   "size/SHA-256")
        return data

    def upload(self, signed: pb.SignedEnvelope, env: pb.UpdateEnvelope, payload: bytes,
               on_progress: Callable[[int], None] | None = None) -> pb.UploadUpdateResponse:
        """Upload a signed update; after a dropped stream, ask the coordinator what it holds and resume there.

        DATA_LOSS (the bytes the coordinator assembled do not match the signed size/SHA-256; it discarded them) is
        answered once by sending the whole payload again from offset 0: the bytes here are the signed ones, so what
        went wrong lay between (a corrupted chunk, a partial file damaged on the coordinator's disk). A second
        DATA_LOSS is raised.

        The first stream starts where the coordinator's copy ends too (one GetUploadStatus first): a site killed
        mid-upload and restarted trains the same round again to the same bytes (fixed seeds), and would otherwise
        restart at offset 0, which also discards what the coordinator holds.
        """
        status = self._retry("GetUploadStatus", lambda: self.stub.GetUploadStatus(
            pb.GetUploadStatusRequest(round=env.round, payload_sha256=env.payload_sha256), timeout=30))
        if status.accepted:
            return pb.UploadUpdateResponse(accepted=True, committed_offset=status.committed_offset)
        offset = status.committed_offset
        if offset:
            log.info("[Site.UploadUpdate] round=%d resuming at offset %d of %d (the coordinator holds the rest)",
                     env.round, offset, len(payload))
        deadline = time.monotonic() + self.cfg.retry_for_s
        delay = 0.2
        resent = False
        while True:
            try:
                resp = self.stub.UploadUpdate(self._upload_messages(signed, payload, offset, on_progress), timeout=300)
                if resp.accepted:
                    return resp
                offset = resp.committed_offset
                continue
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION and "late" in (e.details() or ""):  # type: ignore[attr-defined]
                    raise LateUpdateRefused(e.details()) from e  # type: ignore[attr-defined]
                if e.code() == grpc.StatusCode.DATA_LOSS and not resent:  # type: ignore[attr-defined]
                    log.warning("[Site.UploadUpdate] round=%d the coordinator's copy did not match the signed hash "
                                "(%s); sending the whole update again", env.round, e.details())  # type: ignore[attr-defined]
                    resent, offset = True, 0
                    continue
                pause = retry_after_s(e)  # the coordinator's disk is full: it kept what it wrote, resume later
                if (e.code() not in RETRYABLE and pause is None) or time.monotonic() > deadline:  # type: ignore[attr-defined]
                    raise
                log.info("[Site.UploadUpdate] round=%d %s (%s); resuming in %.1fs", env.round,
                         "stream broke" if pause is None else "coordinator refused",
                         e.code().name, pause or delay)  # type: ignore[attr-defined]
                time.sleep(pause or delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
            status = self._retry("GetUploadStatus", lambda: self.stub.GetUploadStatus(
                pb.GetUploadStatusRequest(round=env.round, payload_sha256=env.payload_sha256), timeout=30))
            if status.accepted:
                return pb.UploadUpdateResponse(accepted=True, committed_offset=status.committed_offset)
            offset = status.committed_offset

    def _upload_messages(self, signed: pb.SignedEnvelope, payload: bytes, offset: int,
                         on_progress: Callable[[int], None] | None) -> Iterator[pb.UploadUpdateRequest]:
        first = True
        for off, data in codec.iter_chunks(payload, self.chunk_size, offset):
            yield pb.UploadUpdateRequest(envelope=signed if first else None, offset=off, data=data)
            first = False
            if on_progress:
                on_progress(off + len(data))
        if first:  # everything was already there: the envelope alone completes it
            yield pb.UploadUpdateRequest(envelope=signed, offset=offset, data=b"")

    def report_metrics(self, round: int, phase: str, metrics: dict[str, float], num_examples: int) -> None:
        req = pb.ReportMetricsRequest(round=round, phase=phase, metrics=metrics, num_examples=num_examples)
        self._retry("ReportMetrics", lambda: self.stub.ReportMetrics(req, timeout=30))
