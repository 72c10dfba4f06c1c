"""AdminService: the administrator's API. Protobuf in, one engine call or view, protobuf out.

Served on the same mTLS port as FederationService. Only a certificate whose role (OU) is ``admin`` may call it;
the role comes from the verified client certificate, never from the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from coordinator import metrics
from coordinator.admin import views
from coordinator.errors import CoordinatorError, PermissionDenied
from coordinator.ingress.servicer import peer_of
from coordinator.rounds.engine import RoundEngine
from coordinator.trust.pki import PeerIdentity
from protos.fedbridge.v1 import admin_service_pb2 as apb
from protos.fedbridge.v1 import admin_service_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)
STATES = {"not_started": apb.FEDERATION_STATE_NOT_STARTED, "running": apb.FEDERATION_STATE_RUNNING,
          "paused": apb.FEDERATION_STATE_PAUSED, "stopped": apb.FEDERATION_STATE_STOPPED,
          "finished": apb.FEDERATION_STATE_FINISHED}


def admin_of(context: grpc.aio.ServicerContext) -> PeerIdentity:
    """The caller's identity, which must be an ``admin`` certificate."""
    peer = peer_of(context)
    if peer.role != "admin":
        raise PermissionDenied(f"AdminService needs an admin certificate; {peer.name!r} has role {peer.role!r}")
    return peer


async def _abort(context: grpc.aio.ServicerContext, method: str, err: CoordinatorError) -> None:
    log.warning("[AdminService.%s] refused %s: %s", method, err.status, err)
    metrics.ADMIN_CALLS.labels(method, err.status).inc()
    await context.abort(getattr(grpc.StatusCode, err.status), str(err))


class AdminServicer(apb_grpc.AdminServiceServicer):
    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    async def _call(self, method: str, context: grpc.aio.ServicerContext, fn: Any) -> Any:
        """Authorise, run ``fn(peer)`` (sync or async), count it, map domain errors to statuses."""
        try:
            peer = admin_of(context)
            self.engine.gate.require_admin(peer)  # revoked / unenrolled admin certificates (CRL + registry)
            out = fn(peer)
            if asyncio.iscoroutine(out):
                out = await out
        except CoordinatorError as e:
            await _abort(context, method, e)
        metrics.ADMIN_CALLS.labels(method, "OK").inc()
        return out

    async def ListSites(self, request: apb.ListSitesRequest, context: grpc.aio.ServicerContext) -> apb.ListSitesResponse:
        rows = await self._call("ListSites", context, lambda _p: views.sites(self.engine))
        return apb.ListSitesResponse(sites=[apb.SiteInfo(**r) for r in rows])

    async def GetStatus(self, request: apb.GetStatusRequest, context: grpc.aio.ServicerContext) -> apb.GetStatusResponse:
        st = await self._call("GetStatus", context, lambda _p: views.status(self.engine))
        st.pop("round_sites")
        return apb.GetStatusResponse(**{**st, "state": STATES[st["state"]]})

    async def ListRounds(self, request: apb.ListRoundsRequest, context: grpc.aio.ServicerContext) -> apb.ListRoundsResponse:
        rows = await self._call("ListRounds", context, lambda _p: views.rounds(self.engine))
        return apb.ListRoundsResponse(rounds=[apb.RoundInfo(**r) for r in rows])

    async def ListEvaluations(self, request: apb.ListEvaluationsRequest,
                              context: grpc.aio.ServicerContext) -> apb.ListEvaluationsResponse:
        rows = await self._call("ListEvaluations", context, lambda _p: views.evaluations(self.engine))
        return apb.ListEvaluationsResponse(evaluations=[apb.EvaluationInfo(**r) for r in rows])

    async def Start(self, request: apb.StartRequest, context: grpc.aio.ServicerContext) -> apb.StartResponse:
        state = await self._call("Start", context, lambda p: self.engine.control.begin(p.name))
        return apb.StartResponse(state=STATES[state])

    async def Pause(self, request: apb.PauseRequest, context: grpc.aio.ServicerContext) -> apb.PauseResponse:
        state = await self._call("Pause", context, lambda p: self.engine.control.pause(p.name))
        return apb.PauseResponse(state=STATES[state])

    async def Resume(self, request: apb.ResumeRequest, context: grpc.aio.ServicerContext) -> apb.ResumeResponse:
        state = await self._call("Resume", context, lambda p: self.engine.control.resume(p.name))
        return apb.ResumeResponse(state=STATES[state])

    async def Stop(self, request: apb.StopRequest, context: grpc.aio.ServicerContext) -> apb.StopResponse:
        state = await self._call("Stop", context, lambda p: self.engine.control.stop(p.name))
        return apb.StopResponse(state=STATES[state])

    async def Publish(self, request: apb.PublishRequest, context: grpc.aio.ServicerContext) -> apb.PublishResponse:
        out = await self._call("Publish", context, lambda p: self.engine.control.publish_latest(p.name))
        return apb.PublishResponse(**out)

    async def RevokeSite(self, request: apb.RevokeSiteRequest,
                         context: grpc.aio.ServicerContext) -> apb.RevokeSiteResponse:
        new = await self._call("RevokeSite", context,
                               lambda p: self.engine.revoke_site(request.site, request.reason or "revoked by the "
                                                                 "administrator", p.name))
        return apb.RevokeSiteResponse(site=request.site, newly_revoked=new)

    async def WithdrawSite(self, request: apb.WithdrawSiteRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[apb.WithdrawSiteResponse]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def progress(done: int, total: int) -> None:  # called from the rebuild's worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (done, total))

        job = asyncio.ensure_future(self._call("WithdrawSite", context, lambda p: self.engine.control.withdraw_site(
            request.site, request.reason[:500], p.name, progress)))
        while not (job.done() and queue.empty()):
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                done, total = getter.result()
                yield apb.WithdrawSiteResponse(rounds_done=done, rounds_total=total)
            else:
                getter.cancel()
        out = job.result()  # re-raises the abort of a refused call
        yield apb.WithdrawSiteResponse(done=True, **{k: out[k] for k in (
            "from_round", "to_round", "version", "path", "global_sha256", "published", "blocked_reason")})
