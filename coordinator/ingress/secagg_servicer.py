"""SecAggService: protobuf in, one :class:`coordinator.privacy.secagg.SecAggCoordinator` call, protobuf out.

Every call passes the same access gate as FederationService (:meth:`RoundEngine.require_site`: site role, not
revoked, enrolled): a revoked site is refused PERMISSION_DENIED before it can read a roster or a share. Identity
always comes from the mTLS client certificate (the certificate PEM itself is kept with the site's keys so
other sites can check the signature against the CA without trusting the coordinator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from coordinator.errors import CoordinatorError, WrongRound
from coordinator.ingress.servicer import peer_of
from coordinator.privacy.secagg import MASK_KEY, SEED, SecAggCoordinator
from coordinator.rounds.engine import RoundEngine
from coordinator.trust.pki import PeerIdentity
from protos.fedbridge.v1 import secagg_service_pb2 as spb
from protos.fedbridge.v1 import secagg_service_pb2_grpc as spb_grpc

_STATUS = {"wait": spb.SECAGG_STATUS_WAIT, "ready": spb.SECAGG_STATUS_READY, "excluded": spb.SECAGG_STATUS_EXCLUDED}
_KIND = {spb.SECRET_KIND_SELF_MASK_SEED: SEED, spb.SECRET_KIND_MASK_KEY: MASK_KEY}
MAX_WAIT_S = 30.0
log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, err: CoordinatorError) -> None:
    log.warning("[SecAggService.%s] refused %s: %s", method, err.status, err)
    await context.abort(getattr(grpc.StatusCode, err.status), str(err))


def _secagg(engine: RoundEngine) -> SecAggCoordinator:
    if engine.secagg is None:
        raise WrongRound("this federation does not run secure aggregation (secure_aggregation.enabled = false)")
    return engine.secagg


class SecAggServicer(spb_grpc.SecAggServiceServicer):
    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    def _peer(self, context: grpc.aio.ServicerContext) -> PeerIdentity:
        """The caller, once the access gate let it through (UNAUTHENTICATED / PERMISSION_DENIED otherwise)."""
        peer = peer_of(context)
        self.engine.require_site(peer)
        return peer

    async def _wait(self, peer: PeerIdentity, sec: SecAggCoordinator, ready: Callable[[], bool], wait_ms: int) -> None:
        """Long-poll; a revocation during the wait ends it with the gate's refusal."""
        await sec.wait(lambda: peer.name in self.engine.gate.revoked or ready(), min(wait_ms / 1000, MAX_WAIT_S))
        self.engine.require_site(peer)

    async def GetSettings(self, request: spb.GetSettingsRequest,
                          context: grpc.aio.ServicerContext) -> spb.GetSettingsResponse:
        try:
            self._peer(context)
        except CoordinatorError as e:
            await _abort(context, "GetSettings", e)
        sec = self.engine.secagg
        if sec is None:
            return spb.GetSettingsResponse(enabled=False)
        return spb.GetSettingsResponse(enabled=True, params=spb.SecAggParams(
            threshold=sec.spec.threshold, clip_range=sec.spec.clip_range, bits=sec.spec.bits,
            vector_length=sec.length))

    async def AdvertiseKeys(self, request: spb.AdvertiseKeysRequest,
                            context: grpc.aio.ServicerContext) -> spb.AdvertiseKeysResponse:
        try:
            peer = self._peer(context)
            cert_pem = context.auth_context()["x509_pem_cert"][0]
            _secagg(self.engine).advertise(peer, cert_pem, request.round, request.keys.keys, request.keys.signature)
        except CoordinatorError as e:
            await _abort(context, "AdvertiseKeys", e)
        return spb.AdvertiseKeysResponse()

    async def GetRoster(self, request: spb.GetRosterRequest, context: grpc.aio.ServicerContext) -> spb.GetRosterResponse:
        try:
            peer, sec = self._peer(context), _secagg(self.engine)
            await self._wait(peer, sec, lambda: sec.roster(peer, request.round)[0] != "wait", request.wait_ms)
            status, entries, params = sec.roster(peer, request.round)
            attempt = sec.attempt(request.round)
        except CoordinatorError as e:
            await _abort(context, "GetRoster", e)
        return spb.GetRosterResponse(status=_STATUS[status], params=params, attempt=attempt, entries=[
            spb.RosterEntry(site=s, certificate_pem=pem, keys=spb.SignedSecAggKeys(keys=k, signature=sig))
            for s, pem, k, sig in entries])

    async def ShareKeys(self, request: spb.ShareKeysRequest, context: grpc.aio.ServicerContext) -> spb.ShareKeysResponse:
        try:
            _secagg(self.engine).share_keys(self._peer(context), request.round,
                                            [(s.site, s.ciphertext) for s in request.shares])
        except CoordinatorError as e:
            await _abort(context, "ShareKeys", e)
        return spb.ShareKeysResponse()

    async def GetShares(self, request: spb.GetSharesRequest, context: grpc.aio.ServicerContext) -> spb.GetSharesResponse:
        try:
            peer, sec = self._peer(context), _secagg(self.engine)
            await self._wait(peer, sec, lambda: sec.shares_for(peer, request.round)[0] != "wait", request.wait_ms)
            status, shares = sec.shares_for(peer, request.round)
        except CoordinatorError as e:
            await _abort(context, "GetShares", e)
        return spb.GetSharesResponse(status=_STATUS[status], attempt=sec.attempt(request.round),
                                     shares=[spb.EncryptedShare(site=s, ciphertext=ct) for s, ct in shares])

    async def GetUnmaskRequest(self, request: spb.GetUnmaskRequestRequest,
                               context: grpc.aio.ServicerContext) -> spb.GetUnmaskRequestResponse:
        try:
            peer, sec = self._peer(context), _secagg(self.engine)
            await self._wait(peer, sec, lambda: sec.unmask_request(peer, request.round)[0] != "wait", request.wait_ms)
            status, survivors, dropped = sec.unmask_request(peer, request.round)
            attempt = sec.attempt(request.round)
        except CoordinatorError as e:
            await _abort(context, "GetUnmaskRequest", e)
        return spb.GetUnmaskRequestResponse(status=_STATUS[status], survivors=survivors, dropped=dropped,
                                            attempt=attempt)

    async def SignSurvivors(self, request: spb.SignSurvivorsRequest,
                            context: grpc.aio.ServicerContext) -> spb.SignSurvivorsResponse:
        try:
            _secagg(self.engine).sign_survivors(self._peer(context), request.round, request.attempt,
                                                request.signature)
        except CoordinatorError as e:
            await _abort(context, "SignSurvivors", e)
        return spb.SignSurvivorsResponse()

    async def GetSurvivorSignatures(self, request: spb.GetSurvivorSignaturesRequest,
                                    context: grpc.aio.ServicerContext) -> spb.GetSurvivorSignaturesResponse:
        try:
            peer, sec = self._peer(context), _secagg(self.engine)
            await self._wait(peer, sec, lambda: sec.survivor_signatures(peer, request.round)[0] != "wait",
                             request.wait_ms)
            status, attempt, survivors, sigs = sec.survivor_signatures(peer, request.round)
        except CoordinatorError as e:
            await _abort(context, "GetSurvivorSignatures", e)
        return spb.GetSurvivorSignaturesResponse(
            status=_STATUS[status], attempt=attempt, survivors=survivors,
            signatures=[spb.SurvivorSignature(site=s, signature=sig) for s, sig in sigs])

    async def UnmaskShares(self, request: spb.UnmaskSharesRequest,
                           context: grpc.aio.ServicerContext) -> spb.UnmaskSharesResponse:
        try:
            shares = [(s.site, _KIND.get(s.kind, "unspecified"), s.share) for s in request.shares]
            _secagg(self.engine).reveal(self._peer(context), request.round, shares, list(request.undecryptable))
        except CoordinatorError as e:
            await _abort(context, "UnmaskShares", e)
        return spb.UnmaskSharesResponse()
