"""The round engine: opens rounds, hands out tasks, validates and stores updates, aggregates at quorum, publishes.

All state lives in :class:`coordinator.store.Store`; the engine keeps only caches and wake-up events in memory,
so a restarted coordinator resumes exactly where the store says it was. It runs on the gRPC server's event loop;
checks and acceptance of an update happen without an ``await`` in between, so an update is either counted in the
round's aggregate or refused, never accepted and then missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator import errors, evaluation, gate, metrics, withdraw
from coordinator.access import SiteGate
from coordinator.adapter import AdapterInit
from coordinator.config import FederationConfig
from coordinator.dp import CentralDp
from coordinator.errors import (
    BadSignature,
    CoordinatorError,
    DuplicateUpdate,
    InvalidUpdate,
    NormTooLarge,
    NotFound,
    PayloadMismatch,
    PermissionDenied,
    ReplayedNonce,
    UpdateTooLarge,
    WrongRound,
)
from coordinator.pki import PeerIdentity
from coordinator.publish import build_provenance, find_published, publish
from coordinator.quorum import HeartbeatAck, RoundPolicy
from coordinator.secagg import SecAggCoordinator
from coordinator.store import Store, UpdateRow, write_durable
from protos import codec
from protos.auditlog import AuditLog, Head
from protos.auditlog import verify as verify_log
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.mapped import map_state
from strategies import flexlora, hetlora
from strategies.error_meter import aggregation_error_from_updates
from strategies.lora import truncate_rank
from strategies.registry import build_strategy
from strategies.types import ClientUpdate, ServerState

log = logging.getLogger(__name__)

PHASES = ("train", "eval_global")
# Rules under which sites train at their own rank, and how the global adapter is projected to a site's rank.
SITE_RANK_RULES = {"hetlora": hetlora.for_site, "flexlora": flexlora.for_site}
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Test-only hold point: ``<phase>:<round>`` makes the coordinator write ``state_dir/hold-<phase>-<round>`` and block
# there (collecting, aggregating, evaluating, publishing), so a crash test can SIGKILL it in exactly that phase.
HOLD_ENV = "FEDBRIDGE_TEST_HOLD"
TICK_S = 0.25  # how often deadlines and heartbeat timeouts are checked while a round is open


@dataclass(frozen=True)
class TaskOffer:
    """What FetchTask answers: wait, train round ``round``, or done (``round`` is then total rounds + 1)."""

    status: str
    round: int = 0
    global_sha256: str = ""
    global_size: int = 0
    residual_sha256: str = ""
    residual_size: int = 0
    deadline_ms: int = 0  # Unix ms at which the round's current attempt closes without this site (0: none)


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


@dataclass
class _Upload:
    env: pb.UpdateEnvelope
    signed: pb.SignedEnvelope
    path: Path
    offset: int
    already_accepted: bool = False


class RoundEngine:
    """Drives a federation through its rounds.

    Args:
        config: The federation config.
        store: Durable state.
        base_sha256: Manifest hash of the base model (checked against the directory at start).
        adapter: The initial adapter and its spec.
    """

    def __init__(self, config: FederationConfig, store: Store, base_sha256: str, adapter: AdapterInit) -> None:
        self.cfg = config
        self.store = store
        self.base_sha256 = base_sha256
        self.spec = adapter.spec
        self._init_state = adapter.state
        self._changed = asyncio.Event()
        self._closing: set[int] = set()
        self._adapters: dict[int, bytes] = {}  # in-memory copies of the global adapters by round (also on disk)
        self._residuals: dict[int, bytes] = {}
        self._lock = asyncio.Lock()
        self._projected: dict[tuple[int, int], bytes] = {}
        self.finished = asyncio.Event()
        self.failed = asyncio.Event()
        self.fatal: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.strategy = build_strategy(config.strategy, config.strategy_params)
        # HetLoRA / FlexLoRA: each site trains at the rank it declared at Join; others train the federation's rank.
        self.project_to_site = SITE_RANK_RULES.get(self.strategy.name)
        self._site_ranks: dict[str, int] = {}
        self._specs: dict[int, pb.AdapterSpec] = {self.spec.rank: self.spec}
        self._control = "running"  # administrator's control state, durable in store meta "control" (see start())
        self._seen: dict[str, float] = {}  # site -> time.time() of its last call (in memory; the store keeps joins)
        self._told_done: set[str] = set()  # sites told "done" by a stopped federation, and those that then reported
        self._final_reports: set[str] = set()
        # Secure aggregation: the round's updates arrive masked and only their sum is ever unmasked.
        self.secagg: SecAggCoordinator | None = None
        if config.secure_aggregation.enabled:
            self.secagg = SecAggCoordinator(config.secure_aggregation, store, config.federation_id,
                                            [(t.name, tuple(t.shape)) for t in self.spec.tensors], config.min_sites,
                                            on_ready=self._advance_in_background)
        # Security (issue #5): the hash-chained audit log (its head also kept in the store), revoked site names,
        # and the enrolment registry + CRL when the federation uses them.
        self.audit = AuditLog(self.store.dir / "audit.jsonl")
        kept = self.store.get_meta("audit_head")
        if kept is not None:  # refuse to extend a log whose tail was cut off (the .head file may be gone too)
            report = verify_log(self.audit.path, expected_head=Head.parse(kept))
            if not report.ok:
                raise RuntimeError(f"{self.audit.path}: the audit log does not reach the head kept in the store: "
                                   f"{report.problems[0]}")
        self.gate = SiteGate(config, store, self._audit, self._notify)
        self._watch: asyncio.Task[None] | None = None
        p = config.privacy  # central DP: clip each update and noise the aggregate (coordinator/dp.py)
        self.central_dp = CentralDp(p.noise_multiplier, p.clip_norm, p.delta) if p.mode == "central" else None
        self.audit = AuditLog(self.store.dir / "audit.jsonl")
        self.quorum = RoundPolicy(config, store, self._audit, self._closing)  # quorum, deadline, heartbeats, late

    def _audit(self, event: str, fields: dict[str, Any]) -> None:
        self.audit.append(event, fields)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create round 1, or resume from whatever the store holds."""
        fed = self.store.get_meta("federation_id")
        if fed is not None and fed != self.cfg.federation_id:
            raise RuntimeError(f"state dir {self.store.dir} belongs to federation {fed!r}, not {self.cfg.federation_id!r}")
        base = self.store.get_meta("base_model_sha256")
        if base is not None and base != self.base_sha256:
            raise RuntimeError(f"base model changed since the federation started ({base[:16]}… -> {self.base_sha256[:16]}…)")
        spec = self.store.get_meta("adapter_spec_sha256")
        if spec is not None and spec != self.spec.sha256:
            raise RuntimeError("the [lora] settings changed since the federation started; its adapters no longer fit")
        if fed is None:
            self.store.set_meta("federation_id", self.cfg.federation_id)
            self.store.set_meta("base_model_sha256", self.base_sha256)
            self.store.set_meta("adapter_spec_sha256", self.spec.sha256)
        if self.store.get_meta("control") is None:
            self.store.set_meta("control", "running" if self.cfg.autostart else "not_started")
        self._control = self.store.get_meta("control") or "running"
        cur = self.store.current_round()
        if cur is None:
            payload = codec.encode_state(self._init_state)
            self.store.put_adapter(1, payload)
            self.store.open_round(1, codec.sha256_hex(payload))
            log.info("[RoundEngine.start] federation=%s round=1 opened", self.cfg.federation_id)
        else:
            log.info("[RoundEngine.start] federation=%s resuming at round=%d state=%s", self.cfg.federation_id,
                     cur.round, cur.state)
        if self.gate.access is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self.gate.watch())
        if self.cfg.evaluation.enabled:  # refuse at start an evaluation that cannot run or would score silently
            evaluation.check_benchmarks(self.cfg.evaluation)
            asyncio.get_running_loop().run_in_executor(None, evaluation.warm_up)  # hide the import behind round 1
        if self.secagg is not None:  # closes SecAgg stages at their deadlines even when no site calls
            ticker = asyncio.get_running_loop().create_task(self.secagg.run_ticker())
            self._tasks.add(ticker)
            ticker.add_done_callback(self._advance_done)
        await self._advance()
        q = self.cfg.quorum
        if q.deadline_s or q.heartbeat_timeout_s:
            self._keep(asyncio.get_running_loop().create_task(self._tick()))

    async def _advance(self) -> None:
        """Make progress from whatever state the store is in (at start, after each accepted update, on each tick).

        A round goes open -> closing (the decision to close is committed with its reason; no update is taken after
        it) -> closed (aggregated). Every step is in the store first, so a restart at any point continues it.
        """
        async with self._lock:
            while True:
                if self._held():
                    break
                cur = self.store.current_round()
                assert cur is not None
                if cur.state == "open":
                    ups = self.store.updates(cur.round)
                    if self.secagg is not None:  # the round closes once its masks can be removed
                        self.secagg.tick(cur.round)
                        decision = (("quorum_reached", {"updates": len(ups), "secure_aggregation": True})
                                    if self.secagg.ready(cur.round) else None)
                    else:
                        decision = self.quorum.decide(cur, ups)
                    if decision is None:
                        if ups:
                            self._hold("collecting", cur.round)
                        break
                    event, detail = decision
                    if event == "round_abandoned":
                        self.quorum.abandon(cur, detail)
                        self._notify()
                        continue
                    self.store.mark_closing(cur.round, cur.attempt, event, detail)
                    self._audit(event, {"round": cur.round, "attempt": cur.attempt, **detail})
                    log.info("[RoundEngine] round=%d attempt=%d closing: %s %s", cur.round, cur.attempt, event, detail)
                elif cur.state == "closing":
                    ups = self.store.updates(cur.round)
                    self._closing.add(cur.round)
                    try:
                        await asyncio.to_thread(self._aggregate, cur.round, ups)
                    finally:
                        self._closing.discard(cur.round)
                    self._audit("round_closed", {"round": cur.round, "updates": len(ups)})
                elif self._evaluation_due(cur.round):
                    await asyncio.to_thread(self._evaluate, cur.round)
                elif cur.round < self.cfg.rounds:
                    self.store.open_round(cur.round + 1, cur.output_sha256 or "")
                    self._audit("round_opened", {"round": cur.round + 1})
                    log.info("[RoundEngine] round=%d opened", cur.round + 1)
                elif not self.store.release_decided(self.cfg.rounds):
                    await asyncio.to_thread(self._publish)
                else:
                    self.finished.set()
                    break
                self._notify()
        self._notify()

    # -- quorum, deadline, heartbeats -----------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Check deadlines and heartbeat timeouts while rounds are open."""
        while not self.finished.is_set():
            await asyncio.sleep(TICK_S)
            cur = self.store.current_round()
            if cur is not None and cur.state == "open":
                await self._advance()

    def heartbeat(self, peer: PeerIdentity, round: int, phase: str, step: int, total_steps: int) -> HeartbeatAck:
        """A site says it is alive and how far it trained; see :meth:`RoundPolicy.heartbeat`."""
        self._require_site(peer)
        return self.quorum.heartbeat(peer.name, round, phase, step, total_steps)

    def _hold(self, phase: str, round: int) -> None:
        """Test-only: block forever in ``phase`` of ``round`` when ``FEDBRIDGE_TEST_HOLD`` says so (see HOLD_ENV)."""
        if os.environ.get(HOLD_ENV) != f"{phase}:{round}":
            return
        write_durable(self.store.dir / f"hold-{phase}-{round}", b"")
        log.warning("[RoundEngine] round=%d holding in phase %s (%s); waiting to be killed", round, phase, HOLD_ENV)
        while True:
            time.sleep(3600)

    def _advance_in_background(self) -> None:
        """Run :meth:`_advance` as a task that is kept referenced and whose failure is never silent."""
        self._keep(asyncio.get_running_loop().create_task(self._advance()))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._advance_done)

    def _advance_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A failed aggregation/evaluation/publication would otherwise leave every site long-polling forever. Stop
        # loudly instead: the store is consistent, so a restarted coordinator resumes from the same point.
        self.fatal = task.exception()
        log.error("[RoundEngine] round engine failed; stopping the coordinator (a restart resumes from the store)",
                  exc_info=self.fatal)
        self.failed.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- tasks --------------------------------------------------------------------------------------------------
    def join(self, peer: PeerIdentity, agent_version: str, lora_rank: int) -> None:
        try:
            self._require_site(peer)
        except CoordinatorError as e:
            self._audit("join_refused", {"site": peer.name, "role": peer.role, "status": e.status,
                                         "reason": str(e)[:500]})
            raise
        rank = int(lora_rank) or self.spec.rank
        if self.project_to_site is None and rank != self.spec.rank:
            raise WrongRound(f"site {peer.name!r} declared LoRA rank {rank} but this federation trains rank "
                             f"{self.spec.rank} with strategy {self.strategy.name!r} (mixed ranks need hetlora or flexlora)")
        if not 1 <= rank <= self.spec.rank:
            raise WrongRound(f"site {peer.name!r} declared LoRA rank {rank}; this federation allows 1..{self.spec.rank}")
        self.store.upsert_site(peer.name, peer.fingerprint, agent_version[:64], rank)
        self._site_ranks[peer.name] = rank
        region = self.gate.region(peer)
        self.store.set_site_region(peer.name, region)
        self._audit("site_joined", {"site": peer.name, "region": region, "cert_sha256": peer.fingerprint,
                                    "serial": str(peer.serial), "agent_version": agent_version[:64], "lora_rank": rank})
        self.quorum.touch(peer.name)
        log.info("[FederationService.Join] site=%s agent=%s", peer.name, agent_version[:64])

    def site_rank(self, site: str) -> int:
        """The LoRA rank ``site`` trains (declared at Join and stored; the federation's rank by default)."""
        if site not in self._site_ranks:
            stored = {s["name"]: s["lora_rank"] for s in self.store.sites()}
            self._site_ranks[site] = int(stored.get(site) or self.spec.rank)
        return self._site_ranks[site]

    def spec_for(self, site: str) -> pb.AdapterSpec:
        """The adapter spec ``site`` trains: the federation's, or a lower-rank one with the same alpha/r scaling."""
        rank = self.site_rank(site)
        if rank not in self._specs:
            shapes = truncate_rank(self._init_state, rank)
            self._specs[rank] = codec.make_adapter_spec(shapes, rank, self.spec.alpha * rank / self.spec.rank,
                                                        self.spec.dropout, list(self.spec.target_modules))
        return self._specs[rank]

    def site_adapter_bytes(self, site: str, round: int) -> bytes:
        """The global adapter of ``round`` as ``site`` receives it (projected to its rank under mixed ranks)."""
        data = self.adapter_bytes(round)
        rank = self.site_rank(site)
        if self.project_to_site is None or rank == self.spec.rank:
            return data
        key = (round, rank)
        if key not in self._projected:
            self._projected[key] = codec.encode_state(self.project_to_site(codec.decode_state(data), rank))
        return self._projected[key]

    def _offer(self, site: str) -> TaskOffer:
        if self._control != "running":
            return self._held_offer(site)
        if self.finished.is_set():
            final = self.cfg.rounds + 1
            return TaskOffer("done", final, *self._adapter_meta(site, final), *self._residual_meta(final))
        cur = self.store.current_round()
        if cur is None or cur.state != "open" or cur.round in self._closing:
            return TaskOffer("wait")
        if self.store.update_trained_on(site, cur.round) is not None:
            return TaskOffer("wait")
        if self.secagg is not None and self.secagg.roster_closed(cur.round):  # too late to join this round's SecAgg
            return TaskOffer("wait")
        return TaskOffer("train", cur.round, *self._adapter_meta(site, cur.round), *self._residual_meta(cur.round),
                         self.quorum.deadline_ms(cur))

    async def fetch_task(self, peer: PeerIdentity, wait_s: float) -> TaskOffer:
        """Long-poll: return a task as soon as one exists for this site, else ``wait`` after ``wait_s``."""
        self._require_site(peer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(wait_s, self.cfg.long_poll_ms / 1000))
        while True:
            self._require_site(peer)  # a revocation wakes this loop and ends the long-poll
            self.quorum.touch(peer.name)  # a site held in a long poll is alive
            offer = self._offer(peer.name)
            remaining = deadline - loop.time()
            if offer.status != "wait" or remaining <= 0:
                return offer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def adapter_bytes(self, round: int) -> bytes:
        """The global adapter that is the input of ``round`` (``rounds + 1``: the final one)."""
        if round not in self._adapters:
            path = self.store.adapter_path(round)
            if round < 1 or not path.exists():
                raise NotFound(f"no global adapter for round {round}")
            self._adapters[round] = path.read_bytes()
        return self._adapters[round]

    def _adapter_meta(self, site: str, round: int) -> tuple[str, int]:
        data = self.site_adapter_bytes(site, round)
        return codec.sha256_hex(data), len(data)

    def residual_bytes(self, round: int) -> bytes | None:
        """The cumulative, scaled base-weight residual that is the input of ``round`` (None when there is none)."""
        if round not in self._residuals:
            path = self.store.residual_path(round)
            if not path.exists():
                return None
            self._residuals[round] = path.read_bytes()
        return self._residuals[round]

    def _residual_meta(self, round: int) -> tuple[str, int]:
        data = self.residual_bytes(round)
        return ("", 0) if data is None else (codec.sha256_hex(data), len(data))

    # -- uploads ------------------------------------------------------------------------------------------------
    def _require_site(self, peer: PeerIdentity) -> None:
        """Refuse (PERMISSION_DENIED) a non-site, revoked or unenrolled certificate; identity is the certificate's."""
        self.gate.require_site(peer)
        self._seen[peer.name] = time.time()

    def revoke_site(self, name: str, reason: str, actor: str) -> bool:
        """Revoke ``name`` durably and at once: its next call is refused, and its open calls are cut off.

        Args:
            name: The site's certificate name.
            reason: Why (recorded in the store and the audit log).
            actor: Who revoked it (the admin certificate's name).

        Returns:
            False when ``name`` was already revoked (the first record is kept).
        """
        return self.gate.revoke(name, reason, actor)

    # -- audit --------------------------------------------------------------------------------------------------
    def _audit(self, event: str, fields: dict[str, Any]) -> None:
        rec = self.audit.append(event, fields)
        # The head also goes to the store, so `audit verify` detects a cut-off tail even without the .head file.
        self.store.set_meta("audit_head", Head(rec["seq"], rec["hash"]).to_json())

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
        self.quorum.check(env)
        if env.base_model_sha256 != self.base_sha256:
            raise InvalidUpdate(f"update was trained on base model {env.base_model_sha256[:16]}…, "
                                f"the federation pins {self.base_sha256[:16]}…")
        if env.adapter_spec_sha256 != self.spec_for(peer.name).sha256:
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
        return env

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
        path.parent.mkdir(parents=True, exist_ok=True)
        have = path.stat().st_size if path.exists() else 0
        if offset > have:
            raise WrongRound(f"upload resumes at offset {offset} but the coordinator holds {have} bytes")
        with open(path, "ab") as f:
            f.truncate(offset)
        return _Upload(env, signed, path, offset)

    async def receive_upload(self, peer: PeerIdentity, chunks: AsyncIterator[Chunk]) -> UploadResult:
        """Consume one upload stream; store the update durably before returning ``accepted``.

        Every refusal is audited (``update_refused``: status, reason) before it is raised.
        """
        ctx: dict[str, Any] = {}
        try:
            return await self._receive_upload(peer, self.gate.while_allowed(peer, chunks), ctx)
        except CoordinatorError as e:
            self._audit("update_refused", {"site": peer.name, "round": ctx.get("round"), "status": e.status,
                                           "error": type(e).__name__, "reason": str(e)[:500],
                                           "payload_sha256": ctx.get("payload_sha256")})
            raise

    async def _receive_upload(self, peer: PeerIdentity, chunks: AsyncIterator[Chunk], ctx: dict[str, Any]
                              ) -> UploadResult:
        up: _Upload | None = None
        f = None
        try:
            async for ch in chunks:
                if up is None:
                    if ch.signed is None:
                        raise InvalidUpdate("the first message of an upload stream must carry the signed envelope")
                    up = self._begin(peer, ch.signed, ch.offset)
                    ctx.update(round=up.env.round, payload_sha256=up.env.payload_sha256)
                    if up.already_accepted:
                        continue
                    # Blocking appends on purpose: local, small, and ordered with the acceptance checks.
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
        finally:
            if f is not None:
                f.flush()
                f.close()
        if up is None:
            raise InvalidUpdate("empty upload stream")
        update_id = f"{up.env.round}/{peer.name}/{up.env.payload_sha256[:16]}"
        if up.already_accepted:
            return UploadResult(True, up.env.payload_size, update_id)
        if up.offset < up.env.payload_size:
            return UploadResult(False, up.offset, update_id)
        self._accept(peer, up)
        self._advance_in_background()
        return UploadResult(True, up.offset, update_id)

    def _accept(self, peer: PeerIdentity, up: _Upload) -> UpdateRow:
        """Validate the complete payload and store it. No ``await`` here: the round cannot close meanwhile."""
        env = self._check_envelope(peer, up.signed)  # the round may have moved on while bytes streamed in
        payload = up.path.read_bytes()
        try:
            try:
                codec.check_payload(env, payload)
            except codec.PayloadMismatchError as e:
                raise PayloadMismatch(str(e)) from None
            state = codec.decode_state(payload)
            norm: float | None = None  # a masked update's norm says nothing: not recorded
            if self.secagg is not None:
                self.secagg.check_masked(state)
            else:
                codec.check_against_spec(state, self.spec_for(peer.name))
                norm = codec.l2_norm(state)
                if self.cfg.max_update_norm and norm > self.cfg.max_update_norm:
                    raise NormTooLarge(f"update L2 norm {norm:.6g} is above the federation's bound "
                                       f"max_update_norm={self.cfg.max_update_norm:g}")
        except (codec.CodecError, InvalidUpdate) as e:
            up.path.unlink(missing_ok=True)
            log.warning("[FederationService.UploadUpdate] round=%d site=%s refused: %s", env.round, peer.name, e)
            raise (e if isinstance(e, InvalidUpdate) else InvalidUpdate(str(e))) from None
        into, weight, late = self.quorum.route(env)
        row = self.store.accept_update(round=into, site=peer.name, payload=payload,
                                       payload_sha256=env.payload_sha256, num_examples=env.num_examples,
                                       nonce=env.nonce, envelope=up.signed.envelope, signature=up.signed.signature,
                                       trained_round=env.round, weight=weight, event=late)
        if late is not None:
            self._audit(late[0], {"round": into, "site": peer.name, **late[1]})
        up.path.unlink(missing_ok=True)
        self._audit("update_accepted", {"site": peer.name, "round": env.round, "payload_sha256": env.payload_sha256,
                                        "bytes": len(payload), "num_examples": env.num_examples,
                                        "epsilon_spent": env.epsilon_spent, "nonce": env.nonce.hex(),
                                        "l2_norm": None if norm is None else round(norm, 6)})
        metrics.UPDATES_ACCEPTED.inc()
        log.info("[FederationService.UploadUpdate] round=%d site=%s accepted bytes=%d", env.round, peer.name, len(payload))
        return row

    def upload_status(self, peer: PeerIdentity, round: int, payload_sha256: str) -> tuple[int, bool]:
        self._require_site(peer)
        if not _HEX64.fullmatch(payload_sha256):
            raise InvalidUpdate("payload_sha256 must be 64 lower-case hex characters")
        self.quorum.touch(peer.name)
        u = self.store.update_trained_on(peer.name, round)
        if u is not None and u.payload_sha256 == payload_sha256:
            return u.size, True
        path = self.store.partial_path(round, peer.name, payload_sha256)
        return (path.stat().st_size if path.exists() else 0), False

    # -- metrics ------------------------------------------------------------------------------------------------
    def report_metrics(self, peer: PeerIdentity, round: int, phase: str, metrics: dict[str, float],
                       num_examples: int) -> None:
        self._require_site(peer)
        if phase not in PHASES:
            raise InvalidUpdate(f"unknown metrics phase {phase!r}; expected one of {PHASES}")
        if not 1 <= round <= self.cfg.rounds + 1:
            raise InvalidUpdate(f"metrics for round {round} outside 1..{self.cfg.rounds + 1}")
        if len(metrics) > 64:
            raise InvalidUpdate("at most 64 metrics per report")
        for k, v in metrics.items():
            if not _METRIC_NAME.match(k):
                raise InvalidUpdate("metric names must match [a-z][a-z0-9_.]{0,63}")
            if not math.isfinite(v):
                raise InvalidUpdate(f"metric {k!r} is not finite")
        self.store.put_metrics(round, peer.name, phase, metrics, num_examples)
        if phase == "eval_global" and peer.name in self._told_done:  # its last report before exiting (stopped)
            self._final_reports.add(peer.name)
        self._notify()

    # -- aggregation and publishing (run in a worker thread) ----------------------------------------------------
    def _aggregate(self, round: int, ups: list[UpdateRow]) -> None:
        global_state = codec.decode_state(self.adapter_bytes(round))
        if self.secagg is not None:
            self._aggregate_secure(round, ups, global_state)
            return

        # The aggregation-error meter below needs every site's factors, so the rule and the meter share one list of
        # the round's stored updates, each memory-mapped (header re-validated, tensors zero-copy views of the page
        # cache): the rule folds them block by block and the meter reads one module of every site at a time, so the
        # heap holds the outputs, not N decoded copies.
        # A late update carried in from an earlier round weighs num_examples * (1 + staleness)^-a (FedAsync); it
        # gets its own name so a site's fresh and late updates are distinct contributions. Rules that ignore
        # weights (median, trimmed mean, Krum) ignore the staleness factor too.
        updates = [ClientUpdate(u.site if u.trained_round == round else f"{u.site}~r{u.trained_round}",
                                map_state(u.path),
                                u.num_examples if u.weight == 1.0 else u.num_examples * u.weight,  # type: ignore[arg-type]
                                {"lora_rank": self.site_rank(u.site)}) for u in ups]
        dp_info: dict[str, Any] = {}
        if self.central_dp is not None:
            updates, dp_info = self.central_dp.privatize(updates, [r.info for r in self.store.rounds() if r.round < round])
        result = self.strategy.aggregate(global_state, updates, self._server_state(round - 1))
        payload = codec.encode_state(result.state)
        self._carry_residual(round, result.base_residual)
        self.store.put_adapter(round + 1, payload)
        self._hold("aggregating", round)
        if result.server_state is not None:
            self.store.put_server_state(round, result.server_state.rule, result.server_state.to_flat())
        # The aggregation-error meter compares what is published with the exact mean of the sites' B·A products.
        errors = aggregation_error_from_updates(global_state, updates, result.state, result.base_residual)
        finite = [e for e in errors.values() if e == e]
        info: dict[str, Any] = {
            "strategy": self.strategy.name, "strategy_params": dict(self.cfg.strategy_params),
            "updates": {u.site: {"payload_sha256": u.payload_sha256, "num_examples": u.num_examples,
                                 "bytes": u.size} for u in ups if u.trained_round == round},
            "late_updates": [{"site": u.site, "trained_round": u.trained_round, "staleness": u.staleness,
                              "weight": u.weight, "payload_sha256": u.payload_sha256, "num_examples": u.num_examples}
                             for u in ups if u.trained_round != round],
            "decisions": [{"event": e["event"], "attempt": e["attempt"], "site": e["site"], **e["detail"]}
                          for e in self.store.events(round)],
            "strategy_info": dict(result.info),
            "aggregation_error": {"mean": sum(finite) / len(finite) if finite else 0.0,
                                  "max": max(finite, default=0.0), "per_module": errors},
            **({"dp": dp_info} if dp_info else {}),
        }
        self.store.close_round(round, codec.sha256_hex(payload), info)
        log.info("[RoundEngine.aggregate] round=%d sites=%d strategy=%s error_mean=%.4g closed", round, len(ups),
                 self.strategy.name, info["aggregation_error"]["mean"])

    def _aggregate_secure(self, round: int, ups: list[UpdateRow], global_state: dict[str, torch.Tensor]) -> None:
        """Secure aggregation: unmask only the weighted mean and hand it to the rule as one aggregate update.

        The rules allowed here (``linear``) need only the mean; the aggregation-error meter needs each site's
        factors, which no one sees, so it is not measured. Masked inputs stay in the store; shares are deleted.
        """
        agg = self.secagg.unmask(round, ups)  # type: ignore[union-attr]
        update = ClientUpdate("secure-aggregate", agg.mean_delta, agg.total_weight, {"lora_rank": self.spec.rank})
        result = self.strategy.aggregate(global_state, [update], self._server_state(round - 1))
        payload = codec.encode_state(result.state)
        self.store.put_adapter(round + 1, payload)
        if result.server_state is not None:
            self.store.put_server_state(round, result.server_state.rule, result.server_state.to_flat())
        info: dict[str, Any] = {
            "strategy": self.strategy.name, "strategy_params": dict(self.cfg.strategy_params),
            "updates": {u.site: {"payload_sha256": u.payload_sha256, "num_examples": u.num_examples, "bytes": u.size,
                                 "masked": True} for u in ups if u.site in agg.info["sites"]},
            "strategy_info": dict(result.info), "secure_aggregation": agg.info,
            "aggregation_error": {"mean": None, "max": None, "per_module": {},
                                  "note": "not measurable under secure aggregation (no individual update is seen)"},
        }
        self.store.close_round(round, codec.sha256_hex(payload), info)
        self.store.secagg_forget()
        log.info("[RoundEngine.aggregate] round=%d sites=%d dropped=%d strategy=%s secure_aggregation closed", round,
                 len(agg.info["sites"]), len(agg.info["dropped"]), self.strategy.name)

    def _carry_residual(self, round: int, residual: dict[str, Any]) -> None:
        """FedEx-LoRA: add this round's residual, scaled by alpha/r, to the cumulative one sites fold into the base.

        Written before the round's output adapter, so a round never closes with a residual missing.
        """
        previous = self.residual_bytes(round)
        if not residual and previous is None:
            return
        total = codec.decode_state(previous) if previous is not None else {}
        scale = self.spec.alpha / self.spec.rank
        for name, r in residual.items():
            add = (scale * r.to(torch.float64)).to(torch.float32)
            total[name] = total[name] + add if name in total else add.contiguous()
        self.store.put_residual(round + 1, codec.encode_state(total))

    def _server_state(self, round: int) -> ServerState | None:
        """The server optimizer state stored after ``round`` (None before the first or for stateless rules)."""
        if not self.strategy.stateful or round < 1:
            return None
        flat = self.store.get_server_state(round)
        return None if flat is None else ServerState.from_flat(flat[0], flat[1])

    def _evaluation_due(self, round: int) -> bool:
        """Round ``round`` closed, its output is to be evaluated (every k rounds and the last), and was not yet."""
        ev = self.cfg.evaluation
        due = ev.enabled and evaluation.is_due(round, self.cfg.rounds, ev.every_k_rounds)
        return due and self.store.eval_run(round) is None

    def _evaluate(self, round: int) -> None:
        """Run the shared benchmarks on round ``round``'s output merged into the base; record scores or the failure.

        A failed evaluation is recorded (and logged as an error), never scored: the release gate then blocks.
        """
        data = self.adapter_bytes(round + 1)
        residual = self.residual_bytes(round + 1)
        work = self.store.dir / "eval" / f"round-{round:05d}"
        log.info("[RoundEngine.evaluate] round=%d benchmarks=%s", round, [b.name for b in self.cfg.evaluation.benchmarks])
        try:
            report = evaluation.evaluate_adapter(base_model=self.cfg.base_model, spec=self.spec,
                                                 state=codec.decode_state(data), eval_spec=self.cfg.evaluation,
                                                 work_dir=work,
                                                 residual=codec.decode_state(residual) if residual else None)
            self._hold("evaluating", round)
        except Exception as e:  # EvaluationError, and anything EvalScope raises: record it, keep the federation going
            log.exception("[RoundEngine.evaluate] round=%d failed", round)
            self.store.put_eval_run(round, status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                                    adapter_sha256=codec.sha256_hex(data), seconds=0.0, work_dir=work, scores={},
                                    primary_metrics={})
            return
        self.store.put_eval_run(round, status="ok", error="", adapter_sha256=codec.sha256_hex(data),
                                seconds=report.seconds, work_dir=work, scores=report.store_rows(),
                                primary_metrics={b: r.primary_metric for b, r in report.results.items()})
        log.info("[RoundEngine.evaluate] round=%d scores=%s seconds=%.1f", round,
                 {b: f"{v:.4f}" for b, v in report.scores().items()}, report.seconds)

    def _publish(self, final: int | None = None) -> None:
        """Publish round ``final``'s output (default: the last round's) if the release gate passes; else record the
        blocked publication."""
        final = self.cfg.rounds if final is None else final
        data = self.adapter_bytes(final + 1)
        # Idempotent: a crash after the registry write and before the store recorded it left the version there;
        # adopt it (found by federation, round and global adapter hash) instead of publishing the same model again.
        found = find_published(self.cfg.registry_dir / self.cfg.federation_id, self.cfg.federation_id, final,
                               codec.sha256_hex(data))
        if found is not None:
            self.store.add_publication(found[0], final, found[1], found[2])
            self._audit("published", {"round": final, "version": found[0], "manifest_sha256": found[2],
                                      "adopted": True})
            log.warning("[RoundEngine.publish] round=%d already published as v%d before a restart; recorded it",
                        final, found[0])
            return
        run = self.store.eval_run(final)
        scores = ({b: kv["score"] for b, kv in self.store.eval_scores(final).get(final, {}).items()}
                  if run and run["status"] == "ok" else None)
        decision = gate.decide(scores, self.cfg.gate.thresholds, self.cfg.gate.max_regression,
                               gate.last_published(self.cfg.registry_dir / self.cfg.federation_id),
                               evaluation_error=run["error"] if run else "")
        if not decision.passed:
            self.store.add_blocked_publication(final, decision.reason, decision.to_dict())
            self._audit("publication_blocked", {"round": final, "reason": decision.reason[:1000]})
            log.warning("[RoundEngine.publish] round=%d blocked by the release gate: %s", final, decision.reason)
            return
        provenance = build_provenance(self.cfg, self.store, base_sha256=self.base_sha256, spec=self.spec,
                                      strategy=self.strategy.name, global_sha256=codec.sha256_hex(data), gate=decision)
        residual = self.residual_bytes(final + 1)
        version, path, manifest_sha = publish(base_model=self.cfg.base_model, spec=self.spec,
                                              state=codec.decode_state(data), registry_dir=self.cfg.registry_dir,
                                              federation_id=self.cfg.federation_id, provenance=provenance,
                                              base_model_ref=self.cfg.base_model_ref,
                                              max_shard_bytes=self.cfg.publish.max_shard_mb << 20,
                                              residual=codec.decode_state(residual) if residual else None)
        self._hold("publishing", final)
        self.store.add_publication(version, final, path, manifest_sha)
        self._audit("model_published", {"round": final, "version": version, "path": str(path),
                                        "manifest_sha256": manifest_sha, "global_sha256": codec.sha256_hex(data)})

    def drained(self) -> bool:
        """Finished, and every joined site reported its evaluation of the final model."""
        if not self.finished.is_set():
            return False
        if self._control == "stopped":  # every joined site was told it is done and reported its final evaluation
            return {s["name"] for s in self.store.sites()} <= self._final_reports
        final = self.cfg.rounds + 1
        reported = {m[1] for m in self.store.metrics(final) if m[2] == "eval_global"}
        return all(s["name"] in reported for s in self.store.sites())

    # -- administration (AdminService) --------------------------------------------------------------------------
    # The control state lives in store meta "control": not_started | running | paused | stopped. It survives a
    # restart; "finished" is derived (every round ran and the release was decided).
    def control_state(self) -> str:
        """``not_started``, ``running``, ``paused``, ``stopped``, or ``finished``."""
        return "finished" if self._control == "running" and self.finished.is_set() else self._control

    def last_seen(self, site: str) -> float:
        """``time.time()`` of the site's last call (its join time from the store before any call in this process)."""
        if site not in self._seen:
            joined = {s["name"]: s["last_seen_ms"] for s in self.store.sites()}
            return joined.get(site, 0) / 1000
        return self._seen[site]

    async def changed(self, timeout: float) -> None:
        """Return when the federation's state changes (update, metrics, round, control), or after ``timeout`` s."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _held(self) -> bool:
        """Rounds must not advance now (not started, paused or stopped). A stopped federation is finished."""
        if self._control == "stopped":
            self.finished.set()
        return self._control != "running"

    def _held_offer(self, site: str) -> TaskOffer:
        """What a site gets while the administrator holds the federation: wait, or done with the latest global."""
        if self._control != "stopped":
            return TaskOffer("wait")
        closed = [r.round for r in self.store.rounds() if r.state == "closed"]
        latest = closed[-1] + 1 if closed else 1
        self._told_done.add(site)
        return TaskOffer("done", latest, *self._adapter_meta(site, latest), *self._residual_meta(latest))

    def _set_control(self, state: str, actor: str) -> str:
        self._audit("admin_action", {"action": state, "actor": actor})  # recorded before it takes effect
        self.store.set_meta("control", state)
        self._control = state
        log.info("[AdminService] federation=%s control=%s actor=%s", self.cfg.federation_id, state, actor)
        self._notify()
        return self.control_state()

    def begin(self, actor: str = "admin") -> str:
        """Start a federation created with ``autostart = false`` (``start()`` is the process start-up)."""
        if self._control in ("running", "paused"):
            return self.control_state()
        if self._control == "stopped":
            raise errors.InvalidState("the federation was stopped; a stopped federation cannot start again")
        state = self._set_control("running", actor)
        self._advance_in_background()
        return state

    def pause(self, actor: str = "admin") -> str:
        """Offer no new task and advance no round; an upload already in flight is still accepted and stored."""
        if self._control == "paused":
            return self.control_state()
        if self._control != "running" or self.finished.is_set():
            raise errors.InvalidState(f"only a running federation can be paused; it is {self.control_state()}")
        return self._set_control("paused", actor)

    def resume(self, actor: str = "admin") -> str:
        """Undo :meth:`pause`: offer tasks again and make whatever progress the stored state allows."""
        if self._control == "running":
            return self.control_state()
        if self._control != "paused":
            raise errors.InvalidState(f"only a paused federation can be resumed; it is {self.control_state()}")
        state = self._set_control("running", actor)
        self._advance_in_background()
        return state

    def stop(self, actor: str = "admin") -> str:
        """End the federation: no round opens or closes any more, and sites are told it is done (they evaluate the
        latest global and exit). The open round, if any, stays open and unaggregated. Nothing is published: use
        :meth:`publish_latest`."""
        if self._control != "stopped":
            self._set_control("stopped", actor)
        self.finished.set()
        self._notify()
        return self.control_state()

    async def publish_latest(self, actor: str = "admin") -> dict[str, Any]:
        """Run the release gate on the latest closed round's output and publish it, or record why not.

        Returns:
            ``{"published": bool, "round", "version", "path", "blocked_reason"}``.
        """
        async with self._lock:
            closed = [r.round for r in self.store.rounds() if r.state == "closed"]
            if not closed:
                raise errors.InvalidState("no round has closed yet; there is no aggregated global model to publish")
            n_pub, n_blocked = len(self.store.publications()), len(self.store.blocked_publications())
            log.info("[AdminService.Publish] round=%d actor=%s", closed[-1], actor)
            self._audit("admin_action", {"action": "publish", "actor": actor, "round": closed[-1]})
            await asyncio.to_thread(self._publish, closed[-1])
            self._notify()
        pubs, blocked = self.store.publications(), self.store.blocked_publications()
        if len(pubs) > n_pub:
            return {"published": True, "round": closed[-1], "version": pubs[-1]["version"], "path": pubs[-1]["path"],
                    "blocked_reason": ""}
        assert len(blocked) > n_blocked
        return {"published": False, "round": closed[-1], "version": 0, "path": "", "blocked_reason": blocked[-1]["reason"]}

    async def withdraw_site(self, site: str, reason: str = "", actor: str = "admin",
                            progress: withdraw.Progress | None = None) -> dict[str, Any]:
        """Rebuild the global model without ``site``'s updates and publish it as a new version.

        Every closed round from the first one the site contributed to is re-aggregated with the same strategy from
        the other sites' stored updates (:func:`coordinator.withdraw.rebuild_without`, whose docstring says what this
        cannot remove: the other sites trained later rounds from globals the site had influenced). The new version's
        provenance and model card name the withdrawn site and the first rebuilt round. The release gate applies; when
        shared evaluation is configured the rebuilt model is evaluated first.

        Returns:
            ``{"site", "from_round", "to_round", "published", "version", "path", "global_sha256", "blocked_reason"}``.
        """
        if self.secagg is not None:
            raise errors.InvalidState(
                "this federation runs secure aggregation: the coordinator holds only masked updates, whose masks cancel "
                "only over a round's whole set of sites, so no round can be re-aggregated without one site; removing "
                "its contribution would need the remaining sites to retrain")
        self._audit("admin_action", {"action": "withdraw_site", "actor": actor, "site": site, "reason": reason[:500]})
        async with self._lock:
            rb = await asyncio.to_thread(withdraw.rebuild_without, self.store, self.strategy, site,
                                         site_rank=self.site_rank, lora_scale=self.spec.alpha / self.spec.rank,
                                         progress=progress,
                                         privatize=self.central_dp.privatize if self.central_dp is not None else None)
            log.info("[AdminService.WithdrawSite] site=%s rounds=%d..%d rebuilt actor=%s", site, rb.from_round,
                     rb.to_round, actor)
            out = await asyncio.to_thread(withdraw.publish_rebuild, self.cfg, self.store, rb, base_sha256=self.base_sha256,
                                          spec=self.spec, strategy=self.strategy.name, reason=reason, actor=actor)
            self._notify()
        return out
