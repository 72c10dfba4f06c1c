"""Receiving updates: envelope checks, resumable chunked uploads, validation, and durable acceptance.

:class:`UploadIngress` is one part the round engine wires in; it keeps no state between streams (a partial upload
lives on disk, an accepted one in the store).

Accepting a complete upload is off the event loop, so one site's acceptance never stalls every other stream (found
by ``bench/load.py``: with 200 sites uploading at once, serial acceptance on the loop put p99 at 7-8 s). Its heavy
part (reading the partial, the hash, decoding, the spec and norm checks, fsyncing it) runs in a bounded
pool of worker threads; the claim then goes to one committer that claims every update waiting at that moment in one
transaction (:meth:`Store.claim_updates`: one folder fsync and one SQLite commit per batch instead of two per update;
the complete partial file itself is renamed into place, so an update's bytes are written once) and audits them in
one group commit (:meth:`AuditLog.append_many`).
The claim itself refuses an update whose round is no longer open or whose site is revoked, in the same transaction
as the round's decision to close, so an update is either counted in the round's aggregate or refused, never accepted
and then missed; a refused claim checks its envelope again on the loop and gets the answer a fresh upload would.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import metrics
from coordinator.config import FederationConfig
from coordinator.errors import (
    BadSignature,
    CoordinatorError,
    DuplicateUpdate,
    InvalidUpdate,
    NormTooLarge,
    OutOfRange,
    PartialQuotaExceeded,
    PayloadMismatch,
    PermissionDenied,
    ReplayedNonce,
    RoundBusy,
    StaleEnvelope,
    UpdateTooLarge,
    UploadBusy,
    WrongRound,
)
from coordinator.privacy.secagg import SecAggCoordinator
from coordinator.rounds.quorum import RoundPolicy
from coordinator.rounds.store import Claim, Store, UpdateConflict, UpdateRow
from coordinator.trust.pki import PeerIdentity
from fedcommon import compress, tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.clipping import l2_norm

log = logging.getLogger(__name__)

Audit = Callable[[str, dict[str, Any]], None]
AuditMany = Callable[[list[tuple[str, dict[str, Any]]]], None]
RequireSite = Callable[[PeerIdentity], None]  # refuses a non-site, revoked or unenrolled certificate
WhileAllowed = Callable[[PeerIdentity, AsyncIterator["Chunk"]], AsyncIterator["Chunk"]]  # cut off on revocation
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_ROUND = (1 << 31) - 1  # rounds are small counters; anything larger is hostile and SQLite must never see it
# Complete uploads validated at once: each holds its payload and decoded tensors in memory, so the bound is what
# keeps the coordinator's memory flat however many sites finish together (the others wait, holding only a path).
VALIDATE_WORKERS = max(1, min(4, os.cpu_count() or 1))
CLAIM_ATTEMPTS = 3  # a claim refused because its round closed meanwhile is routed again at most this often
_pools: dict[str, ThreadPoolExecutor] = {}


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    """One process-wide pool per job (created on first use), shared by every ingress of the process."""
    if name not in _pools:
        _pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"upload-{name}")
    return _pools[name]


def _finished(task: asyncio.Task[UploadResult]) -> None:
    """Collects the outcome of an acceptance whose stream was cancelled (nobody awaits it any more)."""
    if not task.cancelled() and task.exception() is not None:
        log.info("[FederationService.UploadUpdate] an acceptance ended after its stream: %s", task.exception())


@dataclass(frozen=True)
class Chunk:
    """One message of an upload stream, as domain values."""

    signed: pb.SignedEnvelope | None
    offset: int
    data: bytes


@dataclass(frozen=True)
class UploadResult:
    accepted: bool
    committed_offset: int
    update_id: str


@dataclass(frozen=True)
class _Validated:
    """A complete upload, checked off the event loop, and its durable file (which the claim renames into place)."""

    size: int
    norm: float | None  # None under secure aggregation: a masked update's norm says nothing
    staging: Path


@dataclass(frozen=True)
class _Pending:
    """A claim waiting for the committer, the events to audit once it is stored, and who waits for it."""

    claim: Claim
    events: list[tuple[str, dict[str, Any]]]
    done: asyncio.Future[UpdateRow]


@dataclass
class _Upload:
    env: pb.UpdateEnvelope
    signed: pb.SignedEnvelope
    path: Path
    offset: int
    already_accepted: bool = False
    registered: bool = False  # holds ``path`` in UploadIngress._active (released when the stream ends)


class UploadIngress:
    """Receives, validates and durably accepts site updates (see the module docstring).

    Args:
        config: The federation config.
        store: Durable state (partial uploads, accepted updates, nonces).
        base_sha256: Manifest hash of the base model every update must be trained on.
        require_site: Refuses a non-site, revoked or unenrolled certificate (and notes that the site called).
        while_allowed: Passes a stream through while the site may act; a revocation ends it.
        spec_for: The adapter spec a site trains.
        quorum: The round policy (which round an envelope may be for, where a late update goes).
        secagg: Secure aggregation, when the federation runs it (updates then arrive masked).
        audit: Appends an event to the audit log.
        on_accepted: Called after an update was stored, so the round can advance.
        audit_many: Appends several events in one group commit, from the committer's thread (default: one by one).
    """

    def __init__(self, config: FederationConfig, store: Store, base_sha256: str, *, require_site: RequireSite,
                 while_allowed: WhileAllowed, spec_for: Callable[[str], pb.AdapterSpec], quorum: RoundPolicy,
                 secagg: SecAggCoordinator | None, audit: Audit, on_accepted: Callable[[], None],
                 audit_many: AuditMany | None = None) -> None:
        self.cfg = config
        self.store = store
        self.base_sha256 = base_sha256
        self._require_site = require_site
        self._while_allowed = while_allowed
        self._spec_for = spec_for
        self.quorum = quorum
        self.secagg = secagg
        self._audit = audit
        self._on_accepted = on_accepted
        self._audit_many: AuditMany = audit_many or (lambda events: [audit(e, f) for e, f in events] and None)
        # Partial files being written by a stream now -> the size its envelope declares. One stream per partial
        # (a second would interleave its bytes), and the per-site cap counts a stream's declared size up front.
        self._active: dict[Path, int] = {}
        self._claims: list[_Pending] = []  # waiting for the committer
        self._committer: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[UploadResult]] = set()  # acceptances that outlive a cancelled stream

    def _check_envelope(self, peer: PeerIdentity, signed: pb.SignedEnvelope) -> pb.UpdateEnvelope:
        self._require_site(peer)
        if peer.signing_key is None:
            raise PermissionDenied(f"certificate of site {peer.name!r} carries no envelope-signing key")
        try:
            env = codec.verify_envelope(signed, peer.signing_key)
        except codec.SignatureError as e:
            raise BadSignature(str(e)) from None
        if not _HEX64.fullmatch(env.payload_sha256):  # it names a file under uploads/: never a path
            raise InvalidUpdate("envelope payload_sha256 must be 64 lower-case hex characters")
        if env.site != peer.name:
            raise PermissionDenied(f"envelope names site {env.site!r} but the certificate is {peer.name!r}")
        if env.federation_id != self.cfg.federation_id:
            raise InvalidUpdate(f"envelope is for federation {env.federation_id!r}, this is {self.cfg.federation_id!r}")
        if env.round > MAX_ROUND:
            raise OutOfRange(f"envelope field 'round' = {env.round} is out of range (at most {MAX_ROUND})")
        self.quorum.check(env)
        self._check_created(env)
        if env.base_model_sha256 != self.base_sha256:
            raise InvalidUpdate(f"update was trained on base model {env.base_model_sha256[:16]}…, "
                                f"the federation pins {self.base_sha256[:16]}…")
        if env.adapter_spec_sha256 != self._spec_for(peer.name).sha256:
            raise InvalidUpdate("update follows a different adapter spec than the round's")
        if env.payload_kind != pb.PAYLOAD_KIND_DIFF:
            kind = pb.PayloadKind.Name(env.payload_kind) if env.payload_kind in pb.PayloadKind.values() else env.payload_kind
            raise InvalidUpdate(f"payload kind must be DIFF, got {kind}")
        if self.secagg is not None:
            self.secagg.check_upload(peer.name, env.round)
        if env.payload_size > self.cfg.max_update_bytes:
            raise UpdateTooLarge(f"payload of {env.payload_size} bytes exceeds the limit of {self.cfg.max_update_bytes}")
        if not 0 < env.num_examples <= 1 << 40:  # stored as an SQLite integer and used as a weight
            raise InvalidUpdate("envelope num_examples must be in 1..2**40")
        if not math.isfinite(env.epsilon_spent) or env.epsilon_spent < 0:
            raise InvalidUpdate("envelope epsilon_spent must be a finite number >= 0")
        if self.cfg.privacy.mode == "local" and not (env.epsilon_spent > 0 and env.dp_delta > 0):
            # The coordinator cannot see the noise, but it holds every site to having declared (and signed) it.
            raise InvalidUpdate("this federation runs local differential privacy ([privacy] mode = 'local') but the "
                                "update's signed envelope declares none (epsilon_spent and dp_delta must be > 0)")
        return env

    def _check_created(self, env: pb.UpdateEnvelope) -> None:
        """``created_unix_ms`` (signed) must lie between the opening of the envelope's round and now, each widened
        by ``envelope_clock_skew_s``: an envelope from before its round opened is stale, one from the future is
        forged or from a clock far off."""
        skew_ms = int(self.cfg.envelope_clock_skew_s * 1000)
        now = int(time.time() * 1000)
        opened = self.store.opened_ms(env.round)
        created = env.created_unix_ms
        if created > now + skew_ms:
            raise StaleEnvelope(f"envelope created_unix_ms={created} is {(created - now) / 1000:.0f} s in the future "
                                f"(allowed clock skew: {self.cfg.envelope_clock_skew_s:g} s)")
        if opened is not None and created < opened - skew_ms:
            raise StaleEnvelope(f"envelope created_unix_ms={created} is {(opened - created) / 1000:.0f} s before round "
                                f"{env.round} opened (allowed clock skew: {self.cfg.envelope_clock_skew_s:g} s): stale")

    def _check_partial_quota(self, site: str, path: Path, size: int) -> None:
        """At most ``max_partial_uploads_per_site`` partial uploads and ``max_partial_bytes_per_site`` bytes (each
        stream in flight counted at its declared size) per site, this one included."""
        count, used = 1, size
        for p in self.store.partials_of(site):
            if p == path:
                continue
            try:
                have = p.stat().st_size
            except FileNotFoundError:  # removed meanwhile (its round closed)
                continue
            count += 1
            used += max(have, self._active.get(p, 0))
        if count > self.cfg.max_partial_uploads_per_site:
            raise PartialQuotaExceeded(f"site {site!r} has {count - 1} unfinished uploads; at most "
                                       f"{self.cfg.max_partial_uploads_per_site} are kept (max_partial_uploads_per_site)")
        if used > self.cfg.max_partial_bytes_per_site:
            raise PartialQuotaExceeded(f"site {site!r} would hold {used} bytes of unfinished uploads; at most "
                                       f"{self.cfg.max_partial_bytes_per_site} are kept (max_partial_bytes_per_site)")

    def _begin(self, peer: PeerIdentity, signed: pb.SignedEnvelope, offset: int) -> _Upload:
        env = self._check_envelope(peer, signed)
        mine = [u for u in [self.store.update_trained_on(peer.name, env.round)] if u is not None]
        path = self.store.partial_path(env.round, peer.name, env.payload_sha256)
        if mine:
            if mine[0].nonce == env.nonce and mine[0].payload_sha256 == env.payload_sha256:
                return _Upload(env, signed, path, env.payload_size, already_accepted=True)
            raise DuplicateUpdate(f"site {peer.name!r} already has an accepted update for round {env.round}")
        if self.store.nonce_seen(env.nonce):
            raise ReplayedNonce("envelope nonce was already used (replay)")
        if path in self._active:
            raise UploadBusy("another stream is uploading this payload now; retry once it has ended")
        self._check_partial_quota(peer.name, path, env.payload_size)
        have = path.stat().st_size if path.exists() else 0
        if offset > have:
            raise WrongRound(f"upload resumes at offset {offset} but the coordinator holds {have} bytes")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.truncate(offset)
        self._active[path] = env.payload_size
        return _Upload(env, signed, path, offset, registered=True)

    async def receive_upload(self, peer: PeerIdentity, chunks: AsyncIterator[Chunk]) -> UploadResult:
        """Consume one upload stream; store the update durably before returning ``accepted``.

        Every refusal is audited (``update_refused``: status, reason) before it is raised.
        """
        ctx: dict[str, Any] = {}
        try:
            return await self._receive_upload(peer, self._while_allowed(peer, chunks), ctx)
        except CoordinatorError as e:
            self._audit("update_refused", {"site": peer.name, "round": ctx.get("round"), "status": e.status,
                                           "error": type(e).__name__, "reason": str(e)[:500],
                                           "payload_sha256": ctx.get("payload_sha256")})
            raise

    async def _receive_upload(self, peer: PeerIdentity, chunks: AsyncIterator[Chunk], ctx: dict[str, Any]
                              ) -> UploadResult:
        up: _Upload | None = None
        f = None
        handed_off = False
        try:
            try:
                async for ch in chunks:
                    if up is None:
                        if ch.signed is None:
                            raise InvalidUpdate("the first message of an upload stream must carry the signed envelope")
                        up = self._begin(peer, ch.signed, ch.offset)
                        ctx.update(round=up.env.round, payload_sha256=up.env.payload_sha256)
                        if up.already_accepted:
                            continue
                        # Blocking appends on purpose: local, small (page cache), and in stream order.
                        f = open(up.path, "ab")  # noqa: SIM115, ASYNC230 - closed in the finally below
                    if up.already_accepted:
                        continue
                    if ch.offset != up.offset:
                        raise InvalidUpdate(f"chunk at offset {ch.offset}, expected {up.offset}")
                    if up.offset + len(ch.data) > up.env.payload_size:
                        raise UpdateTooLarge(f"upload exceeds the {up.env.payload_size} bytes the envelope declares")
                    assert f is not None
                    f.write(ch.data)
                    up.offset += len(ch.data)
            except OSError as e:  # a full disk: the partial keeps what was written; the error names it
                if e.filename is None and up is not None:
                    raise OSError(e.errno, e.strerror, str(up.path)) from e
                raise
            finally:
                if f is not None:
                    f.close()  # flushes; one that fails (disk full) still closes, and the outer finally releases
            if up is None:
                raise InvalidUpdate("empty upload stream")
            update_id = f"{up.env.round}/{peer.name}/{up.env.payload_sha256[:16]}"
            if up.already_accepted:
                return UploadResult(True, up.env.payload_size, update_id)
            if up.offset < up.env.payload_size:
                return UploadResult(False, up.offset, update_id)
            # The acceptance runs as a task of its own and finishes even when this stream is cancelled (the site
            # hung up): a claimed update is then audited and advances the round, and the site learns of it from
            # GetUploadStatus. The partial stays registered until it ends, so a retried stream of the same payload
            # cannot truncate it under the worker reading it (that stream is told UploadBusy and retries).
            task = asyncio.get_running_loop().create_task(self._complete(peer, up, update_id))
            handed_off = True
            self._finishing.add(task)
            task.add_done_callback(_finished)
            task.add_done_callback(self._finishing.discard)
            return await asyncio.shield(task)
        finally:
            if up is not None and up.registered and not handed_off:
                self._active.pop(up.path, None)

    async def _complete(self, peer: PeerIdentity, up: _Upload, update_id: str) -> UploadResult:
        try:
            self._check_envelope(peer, up.signed)  # the round may have moved on while bytes streamed in
            if self.store.update_trained_on(peer.name, up.env.round) is not None:  # a concurrent stream won the round
                up.path.unlink(missing_ok=True)
                raise DuplicateUpdate(f"site {peer.name!r} already has an accepted update for round {up.env.round}")
            loop = asyncio.get_running_loop()
            checked = await loop.run_in_executor(_pool("validate", VALIDATE_WORKERS), self._validate, peer.name, up,
                                                 self._spec_for(peer.name))
            self._accepted(peer, up, checked, await self._claim(peer, up, checked))
        finally:
            self._active.pop(up.path, None)
        self._on_accepted()
        return UploadResult(True, up.offset, update_id)

    def _validate(self, site: str, up: _Upload, spec: pb.AdapterSpec) -> _Validated:
        """Read and check the complete payload and stage it durably. Runs in a worker thread, so it touches only the
        upload's own files and the values handed in, never round state (``secagg.check_masked`` reads only the
        round's fixed parameters)."""
        env = up.env
        try:
            payload = up.path.read_bytes()
        except FileNotFoundError:
            raise UploadBusy("the partial upload was removed while it streamed (its round closed); upload it "
                             "again") from None
        try:
            try:
                codec.check_payload(env, payload)
            except codec.PayloadMismatchError as e:
                raise PayloadMismatch(str(e)) from None
            norm: float | None = None  # a masked update's norm says nothing: not recorded
            if self.secagg is not None:
                self.secagg.check_masked(tensors.decode_state(payload))
            else:
                # A compressed update is decoded (and every code, scale and index checked) before the same checks
                # as a dense one; the store keeps the bytes as signed, decoded again when the round aggregates.
                state = compress.decode_update(payload, spec)
                norm = l2_norm(state)
                del state
                if self.cfg.max_update_norm and norm > self.cfg.max_update_norm:
                    raise NormTooLarge(f"update L2 norm {norm:.6g} is above the federation's bound "
                                       f"max_update_norm={self.cfg.max_update_norm:g}")
        except (codec.CodecError, InvalidUpdate) as e:
            up.path.unlink(missing_ok=True)
            log.warning("[FederationService.UploadUpdate] round=%d site=%s refused: %s", env.round, site, e)
            raise (e if isinstance(e, InvalidUpdate) else InvalidUpdate(str(e))) from None
        # The complete partial itself is what the claim renames into place (its bytes are written once): made
        # durable here. Nothing writes to it meanwhile: it stays registered until the acceptance ends.
        fd = os.open(up.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return _Validated(len(payload), norm, up.path)

    async def _claim(self, peer: PeerIdentity, up: _Upload, checked: _Validated) -> UpdateRow:
        """Claim a validated update through the committer; where its round closed meanwhile, check the envelope
        again (the answer a fresh upload would get: late, carried into the next round, or busy) and claim anew."""
        for _ in range(CLAIM_ATTEMPTS):
            env = self._check_envelope(peer, up.signed)
            into, weight, late = self.quorum.route(env)
            claim = Claim(round=into, site=peer.name, payload_sha256=env.payload_sha256, size=checked.size,
                          num_examples=env.num_examples, nonce=env.nonce, envelope=up.signed.envelope,
                          signature=up.signed.signature, trained_round=env.round, weight=weight, event=late,
                          staged=checked.staging, require_open=True)
            fut: asyncio.Future[UpdateRow] = asyncio.get_running_loop().create_future()
            events = [] if late is None else [(late[0], {"round": into, "site": peer.name, **late[1]})]
            events.append(("update_accepted", {"site": peer.name, "round": env.round,
                                               "payload_sha256": env.payload_sha256, "bytes": checked.size,
                                               "num_examples": env.num_examples, "epsilon_spent": env.epsilon_spent,
                                               "nonce": env.nonce.hex(),
                                               "l2_norm": None if checked.norm is None else round(checked.norm, 6)}))
            self._claims.append(_Pending(claim, events, fut))
            if self._committer is None:
                self._committer = asyncio.get_running_loop().create_task(self._commit_claims())
            try:
                return await fut
            except UpdateConflict as e:
                if e.kind == "closed":
                    continue
                if e.kind == "gone":
                    raise UploadBusy("the partial upload was removed while it was accepted (its round closed); "
                                     "upload it again") from None
                up.path.unlink(missing_ok=True)
                if e.kind == "revoked":
                    raise PermissionDenied(str(e)) from None
                raise (DuplicateUpdate(str(e)) if e.kind == "duplicate" else ReplayedNonce(str(e))) from None
        raise RoundBusy(f"round {up.env.round} changed state while the update was claimed; retry the upload")

    async def _commit_claims(self) -> None:
        """The committer: claims every waiting update in one transaction and audits the claimed ones in one group
        commit, in a thread of its own, until none wait."""
        loop = asyncio.get_running_loop()
        try:
            while self._claims:
                batch, self._claims = self._claims, []
                try:
                    got = await loop.run_in_executor(_pool("claim", 1), self._commit_batch, batch)
                except Exception as e:  # the disk or the database failed: every claim of the batch fails with it
                    for p in batch:
                        p.done.set_exception(e)
                    continue
                for p, r in zip(batch, got, strict=True):
                    if isinstance(r, UpdateConflict):
                        p.done.set_exception(r)
                    else:
                        p.done.set_result(r)
        finally:
            self._committer = None

    def _commit_batch(self, batch: list[_Pending]) -> list[UpdateRow | UpdateConflict]:
        """In the committer's thread: the claims, then the audit records of those stored (store first, as ever: a
        kill in between leaves an update stored and not audited, never one audited and not stored)."""
        got = self.store.claim_updates([p.claim for p in batch])
        self._audit_many([ev for p, r in zip(batch, got, strict=True) if not isinstance(r, UpdateConflict)
                          for ev in p.events])
        return got

    def _accepted(self, peer: PeerIdentity, up: _Upload, checked: _Validated, row: UpdateRow) -> None:
        up.path.unlink(missing_ok=True)
        metrics.UPDATES_ACCEPTED.inc()
        log.info("[FederationService.UploadUpdate] round=%d site=%s accepted bytes=%d", up.env.round, peer.name,
                 checked.size)

    def upload_status(self, peer: PeerIdentity, round: int, payload_sha256: str) -> tuple[int, bool]:
        """How many bytes of ``payload_sha256`` the coordinator holds, and whether the update was accepted."""
        self._require_site(peer)
        if round > MAX_ROUND:
            raise OutOfRange(f"field 'round' = {round} is out of range (at most {MAX_ROUND})")
        if not _HEX64.fullmatch(payload_sha256):
            raise InvalidUpdate("payload_sha256 must be 64 lower-case hex characters")
        self.quorum.touch(peer.name)
        u = self.store.update_trained_on(peer.name, round)
        if u is not None and u.payload_sha256 == payload_sha256:
            return u.size, True
        path = self.store.partial_path(round, peer.name, payload_sha256)
        return (path.stat().st_size if path.exists() else 0), False
