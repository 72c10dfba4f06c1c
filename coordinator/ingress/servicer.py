"""FederationService: protobuf in, one engine call, protobuf out. Identity comes from the client certificate."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from coordinator import metrics
from coordinator.config import FederationConfig
from coordinator.errors import CoordinatorError, InvalidUpdate, NotFound, PermissionDenied, Unauthenticated
from coordinator.ingress.uploads import Chunk
from coordinator.rounds.engine import RoundEngine
from coordinator.trust.pki import PeerIdentity, PKIError, peer_identity
from fedcommon.certs import SITE_NAME
from fedcommon.chat import TemplatePin
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
AGENT_POLL_MS = 1000
_TASK_STATUS = {"wait": pb.TASK_STATUS_WAIT, "train": pb.TASK_STATUS_TRAIN, "done": pb.TASK_STATUS_DONE}


@functools.lru_cache(maxsize=1024)
def _identity(cert_pem: bytes) -> PeerIdentity:
    return peer_identity(cert_pem)


def peer_of(context: grpc.aio.ServicerContext) -> PeerIdentity:
    """The caller's identity from its verified mTLS certificate."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("no client certificate on this connection")
    try:
        peer = _identity(pems[0])
    except PKIError as e:
        raise Unauthenticated(str(e)) from None
    if peer.role == "site" and not SITE_NAME.fullmatch(peer.name):  # the CN names files of the store
        raise PermissionDenied(f"certificate common name {peer.name[:80]!r} is not a valid site name "
                               "(letters, digits, '_', '.', '-'; 1-64 characters)")
    return peer


async def _abort(context: grpc.aio.ServicerContext, method: str, err: CoordinatorError) -> None:
    log.warning("[FederationService.%s] refused %s: %s", method, err.status, err)
    metrics.refused(method, err.status)
    await context.abort(getattr(grpc.StatusCode, err.status), str(err))


def build_task(cfg: FederationConfig, round: int, base_sha256: str, template: TemplatePin, spec: pb.AdapterSpec,
               hints: Mapping[str, float | int | str | bool], **download: Any) -> pb.Task:
    """The task of ``round`` as a site receives it (the Flower ServerApp sends the same one).

    ``download`` sets the fields that say where the round's adapter and residual bytes are (sizes, hashes,
    deadline, compression); a transport that carries the bytes in the message leaves them unset.
    """
    t = cfg.training
    return pb.Task(
        federation_id=cfg.federation_id, round=round, total_rounds=cfg.rounds,
        base_model_sha256=base_sha256, base_model_ref=cfg.base_model_ref,
        training=pb.TrainingConfig(mode=t.mode, max_steps=t.max_steps, learning_rate=t.learning_rate,
                                   per_device_batch_size=t.batch_size,
                                   gradient_accumulation_steps=t.gradient_accumulation_steps,
                                   max_length=t.max_length, seed=t.seed, weight_decay=t.weight_decay,
                                   warmup_ratio=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler_type,
                                   beta=t.beta, loss_type=t.loss_type, rpo_alpha=t.rpo_alpha,
                                   simpo_gamma=t.simpo_gamma, cpo_alpha=t.cpo_alpha,
                                   desirable_weight=t.desirable_weight,
                                   undesirable_weight=t.undesirable_weight,
                                   label_smoothing=t.label_smoothing, weight_by=t.weight_by),
        chat_template=template.text, chat_template_sha256=template.sha256, adapter_spec=spec,
        hints=pb.SiteHints(proximal_mu=float(hints.get("proximal_mu", 0.0)),
                           freeze_lora_a=bool(hints.get("freeze_lora_A", False))),
        dp=pb.DpRequest(noise_multiplier=cfg.privacy.noise_multiplier, clip_norm=cfg.privacy.clip_norm)
        if cfg.privacy.mode == "local" else None, **download)


class FederationServicer(pb_grpc.FederationServiceServicer):
    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        try:
            peer = peer_of(context)
            self.engine.join(peer, request.agent_version, request.lora_rank)
        except CoordinatorError as e:
            await _abort(context, "Join", e)
        return pb.JoinResponse(federation_id=self.engine.cfg.federation_id, site=peer.name,
                               poll_interval_ms=AGENT_POLL_MS)

    async def FetchTask(self, request: pb.FetchTaskRequest, context: grpc.aio.ServicerContext) -> pb.FetchTaskResponse:
        try:
            peer = peer_of(context)
            offer = await self.engine.fetch_task(peer, request.wait_ms / 1000)
        except CoordinatorError as e:
            await _abort(context, "FetchTask", e)
        resp = pb.FetchTaskResponse(status=_TASK_STATUS[offer.status])
        if offer.status != "wait":
            resp.task.CopyFrom(build_task(
                self.engine.cfg, offer.round, self.engine.base_sha256, self.engine.template,
                self.engine.adapters.spec_for(peer.name), self.engine.strategy.site_params,
                global_adapter_sha256=offer.global_sha256, global_adapter_size=offer.global_size,
                deadline_unix_ms=offer.deadline_ms, global_adapter_compressed=self.engine.adapters.compress_download,
                base_residual_sha256=offer.residual_sha256, base_residual_size=offer.residual_size))
        return resp

    async def DownloadAdapter(self, request: pb.DownloadAdapterRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadAdapterResponse]:
        try:
            peer = peer_of(context)
            self.engine.require_site(peer)
            if request.artifact == pb.ARTIFACT_KIND_BASE_RESIDUAL:
                residual = self.engine.adapters.residual_bytes(request.round)
                if residual is None:
                    raise NotFound(f"round {request.round} has no base residual")
                data = residual
            else:
                data = self.engine.adapters.site_adapter_bytes(peer.name, request.round)
            chunks = list(codec.iter_chunks(data, offset=min(request.offset, len(data))))
        except (CoordinatorError, codec.CodecError) as e:
            err = e if isinstance(e, CoordinatorError) else CoordinatorError(str(e))
            await _abort(context, "DownloadAdapter", err)
        for offset, chunk in chunks:
            yield pb.DownloadAdapterResponse(offset=offset, data=chunk)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UploadUpdateRequest],
                           context: grpc.aio.ServicerContext) -> pb.UploadUpdateResponse:
        async def chunks() -> AsyncIterator[Chunk]:
            try:
                async for req in request_iterator:  # messages are parsed here, inside the handler
                    metrics.BYTES_RECEIVED.inc(len(req.data))
                    yield Chunk(req.envelope if req.HasField("envelope") else None, req.offset, req.data)
            except DecodeError:
                raise InvalidUpdate("a message of the upload stream is not an UploadUpdateRequest") from None

        try:
            result = await self.engine.ingress.receive_upload(peer_of(context), chunks())
        except CoordinatorError as e:
            await _abort(context, "UploadUpdate", e)
        return pb.UploadUpdateResponse(accepted=result.accepted, committed_offset=result.committed_offset,
                                       update_id=result.update_id)

    async def GetUploadStatus(self, request: pb.GetUploadStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.GetUploadStatusResponse:
        try:
            offset, accepted = self.engine.ingress.upload_status(peer_of(context), request.round, request.payload_sha256)
        except CoordinatorError as e:
            await _abort(context, "GetUploadStatus", e)
        return pb.GetUploadStatusResponse(committed_offset=offset, accepted=accepted)

    async def ReportMetrics(self, request: pb.ReportMetricsRequest,
                            context: grpc.aio.ServicerContext) -> pb.ReportMetricsResponse:
        try:
            self.engine.report_metrics(peer_of(context), request.round, request.phase, dict(request.metrics),
                                       request.num_examples)
        except CoordinatorError as e:
            await _abort(context, "ReportMetrics", e)
        return pb.ReportMetricsResponse()

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        try:
            ack = self.engine.heartbeat(peer_of(context), request.round, request.phase, request.step,
                                        request.total_steps)
        except CoordinatorError as e:
            await _abort(context, "Heartbeat", e)
        return pb.HeartbeatResponse(current_round=ack.current_round, round_open=ack.round_open,
                                    deadline_unix_ms=ack.deadline_ms, interval_ms=ack.interval_ms)

    async def ReportError(self, request: pb.ReportErrorRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReportErrorResponse:
        try:
            self.engine.report_error(peer_of(context), request.round, request.phase, request.error_type,
                                     request.message)
        except CoordinatorError as e:
            await _abort(context, "ReportError", e)
        return pb.ReportErrorResponse()
