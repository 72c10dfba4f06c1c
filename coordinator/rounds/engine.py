"""The round engine: opens rounds, hands out tasks, validates and stores updates, aggregates at quorum, publishes.

All state lives in :class:`coordinator.rounds.store.Store`; the engine keeps only caches and wake-up events in memory,
so a restarted coordinator resumes exactly where the store says it was. It runs on the gRPC server's event loop;
checks and acceptance of an update happen without an ``await`` in between, so an update is either counted in the
round's aggregate or refused, never accepted and then missed.

Composed, not inherited: each part (see :class:`RoundEngine`) is one object holding its own state, given here what
it needs; callers reach a part directly (``engine.ingress``, ``engine.control``, ``engine.adapters``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from coordinator.admin.control import AdminControl
from coordinator.config import FederationConfig
from coordinator.errors import CoordinatorError, FederationStopped, InvalidUpdate, WrongRound
from coordinator.ingress.uploads import UploadIngress
from coordinator.privacy.central_dp import CentralDp
from coordinator.privacy.secagg import SecAggCoordinator
from coordinator.release import evaluation
from coordinator.rounds.adapter import AdapterInit
from coordinator.rounds.adapters import Adapters
from coordinator.rounds.quorum import HeartbeatAck, RoundPolicy
from coordinator.rounds.steps import RoundSteps
from coordinator.rounds.store import Store, write_durable
from coordinator.trust.access import SiteGate
from coordinator.trust.pki import PeerIdentity
from fedcommon import tensors
from fedcommon.auditlog import AuditLog, Head, read_records
from fedcommon.auditlog import verify as verify_log
from fedcommon.chat import TemplatePin
from protos import codec
from strategies.registry import SITE_RANK_RULES, build_strategy

log = logging.getLogger(__name__)

PHASES = ("train", "eval_global")
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
# ReportError's bounds: a class name, a phase word, and one printable line (no data: the site sanitizes, this checks).
_ERROR_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
_ERROR_PHASE = re.compile(r"^[a-z_]{1,32}$")
MAX_ERROR_MESSAGE = 200
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


class RoundEngine:
    """Drives a federation through its rounds, wiring its parts together by composition.

    The engine owns the round state machine (:meth:`_advance` under :attr:`_lock`), task offers, wake-ups and
    background tasks. Its parts, each holding its own state and given explicitly what it needs:
    :attr:`adapters` (adapter caches, site ranks), :attr:`ingress` (uploads), :attr:`steps` (aggregate, evaluate,
    publish), :attr:`control` (the administrator's control state), :attr:`quorum` (quorum, deadlines, heartbeats),
    :attr:`gate` (site access and revocation), :attr:`secagg` and :attr:`central_dp` (privacy).

    Args:
        config: The federation config.
        store: Durable state.
        base_sha256: Manifest hash of the base model (checked against the directory at start).
        adapter: The initial adapter and its spec.
    """

    def __init__(self, config: FederationConfig, store: Store, base_sha256: str, adapter: AdapterInit,
                 template: TemplatePin | None = None) -> None:
        self.cfg = config
        self.store = store
        self.base_sha256 = base_sha256
        self.template = template or TemplatePin()  # the chat template every task pins (coordinator.basemodel)
        self.spec = adapter.spec
        self._init_state = adapter.state
        self._changed = asyncio.Event()  # any change of state (watchers: dashboard, admin)
        self._tasks_changed = asyncio.Event()  # a change a site's task may depend on (the sites' long polls)
        self._closing: set[int] = set()  # rounds being aggregated now (shared with the quorum policy: no late routing)
        # The _advance task that waits for the lock (None: none waits): it will see every later change too.
        self._advance_queued: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.finished = asyncio.Event()
        self.failed = asyncio.Event()
        self.fatal: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.strategy = build_strategy(config.strategy, config.strategy_params)
        # HetLoRA / FlexLoRA: each site trains at the rank it declared at Join; others train the federation's rank.
        self.project_to_site = SITE_RANK_RULES.get(self.strategy.name)
        self.adapters = Adapters(store, self.spec, adapter.state, self.project_to_site,
                                 compress_download=config.lora.compress_download)
        self._seen: dict[str, float] = {}  # site -> time.time() of its last call (in memory; the store keeps joins)
        self._told_done: set[str] = set()  # sites told "done" (finished or stopped); _final_reports: those that then reported
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
        if self.secagg is not None:  # a revoked site is never waited for; abandoned attempts are audited
            self.secagg.revoked, self.secagg.audit = (lambda: self.gate.revoked), self._audit
        self._watch: asyncio.Task[None] | None = None
        p = config.privacy  # central DP: clip each update and noise the aggregate (coordinator/privacy/central_dp.py)
        self.central_dp = CentralDp(p.noise_multiplier, p.clip_norm, p.delta) if p.mode == "central" else None
        self.quorum = RoundPolicy(config, store, self._audit, self._closing)  # quorum, deadline, heartbeats, late
        self.ingress = UploadIngress(config, store, base_sha256, require_site=self.require_site,
                                     while_allowed=self.gate.while_allowed, spec_for=self.adapters.spec_for,
                                     quorum=self.quorum, secagg=self.secagg, audit=self._audit,
                                     on_accepted=self._advance_in_background, audit_many=self._audit_many)
        self.steps = RoundSteps(config, store, base_sha256, self.strategy, self.adapters, self.secagg, self.central_dp,
                                audit=self._audit, hold=self._hold)
        self.control = AdminControl(config, store, base_sha256, spec=self.spec, strategy=self.strategy,
                                    site_rank=self.adapters.site_rank, spec_for=self.adapters.spec_for,
                                    central_dp=self.central_dp,
                                    secure_aggregation=self.secagg is not None, lock=self._lock, finished=self.finished,
                                    publish=self.steps.publish, advance=self._advance_in_background, audit=self._audit,
                                    notify=self._notify)

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
        self.control.load()
        cur = self.store.current_round()
        if cur is None:
            payload = tensors.encode_state(self._init_state)
            self.store.put_adapter(1, payload)
            self.store.open_round(1, codec.sha256_hex(payload))
            log.info("[RoundEngine.start] federation=%s round=1 opened", self.cfg.federation_id)
        else:
            log.info("[RoundEngine.start] federation=%s resuming at round=%d state=%s", self.cfg.federation_id,
                     cur.round, cur.state)
            self._audit_unaudited_updates()
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
            if self._advance_queued is asyncio.current_task():
                self._advance_queued = None  # this pass has started: a change from now on needs a new pass
            moved = False  # whether this pass changed the round's state (or the federation's)
            while True:
                if self.control.held():
                    break
                cur = self.store.current_round()
                assert cur is not None
                if cur.state == "open":
                    ups = self.store.updates(cur.round)
                    if self.secagg is not None:  # the round closes once its masks can be removed
                        self.secagg.tick(cur.round)
                        if (why := self.secagg.failure(cur.round)) is not None:  # terminal: kept, reported
                            raise self._stopped(cur.round, why)
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
                        await asyncio.to_thread(self.steps.aggregate, cur.round, ups)
                    finally:
                        self._closing.discard(cur.round)
                    self._audit("round_closed", {"round": cur.round, "updates": len(ups)})
                elif self.steps.evaluation_due(cur.round):
                    await asyncio.to_thread(self.steps.evaluate, cur.round)
                elif cur.round < self.cfg.rounds:
                    self.store.open_round(cur.round + 1, cur.output_sha256 or "")
                    self._audit("round_opened", {"round": cur.round + 1})
                    log.info("[RoundEngine] round=%d opened", cur.round + 1)
                elif not self.store.release_decided(self.cfg.rounds):
                    await asyncio.to_thread(self.steps.publish)
                else:
                    moved = True
                    self.finished.set()
                    break
                moved = True  # only a pass that stops where the round still collects (or is held) moves nothing
                self._notify()
        # A pass that found an open round still collecting changed nothing a site's task depends on: the watchers
        # of the federation's state (dashboard, admin) hear of the new update, the sites' long polls sleep on.
        self._notify(tasks=moved)

    # -- quorum, deadline, heartbeats -----------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Mark silent sites, and check deadlines and heartbeat timeouts while rounds are open."""
        while not self.finished.is_set():
            await asyncio.sleep(TICK_S)
            self.quorum.sweep(self._watched_sites())
            cur = self.store.current_round()
            if cur is not None and cur.state == "open":
                await self._advance()

    def _watched_sites(self) -> list[str]:
        """Joined sites whose silence matters: not revoked, not told the federation is done (they leave)."""
        revoked = {r["name"] for r in self.store.revocations()}
        return [s["name"] for s in self.store.sites() if s["name"] not in revoked and s["name"] not in self._told_done]

    def report_error(self, peer: PeerIdentity, round: int, phase: str, error_type: str, message: str) -> None:
        """A site reports its own crash: shown as failed, not waited for in the open round (see
        :meth:`RoundPolicy.failed`). Only a class name and one short printable line are taken; anything else is
        refused whole (INVALID_ARGUMENT), never stored cut or cleaned."""
        self.require_site(peer)
        if not _ERROR_TYPE.match(error_type):
            raise InvalidUpdate("ReportError.error_type must be a class name ([A-Za-z_][A-Za-z0-9_.]{0,63})")
        if not _ERROR_PHASE.match(phase):
            raise InvalidUpdate("ReportError.phase must match [a-z_]{1,32}")
        if len(message) > MAX_ERROR_MESSAGE:
            raise InvalidUpdate(f"ReportError.message is {len(message)} characters; at most {MAX_ERROR_MESSAGE}")
        if not message.isprintable():
            raise InvalidUpdate("ReportError.message must be one printable line (no line breaks or control characters)")
        if round > self.cfg.rounds + 1:
            raise InvalidUpdate(f"ReportError.round {round} is outside 0..{self.cfg.rounds + 1}")
        line = f"{error_type}: {message}" if message else error_type
        if self.quorum.failed(peer.name, round, phase, line):
            self._notify()
            self._advance_in_background()  # the open round may close now without it

    def heartbeat(self, peer: PeerIdentity, round: int, phase: str, step: int, total_steps: int) -> HeartbeatAck:
        """A site says it is alive and how far it trained; see :meth:`RoundPolicy.heartbeat`."""
        self.require_site(peer)
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
        """Run :meth:`_advance` as a task that is kept referenced and whose failure is never silent. Coalesced: while
        one is still waiting for the lock, another would only read the same state again (200 sites' acceptances
        would read the round's updates 200 times)."""
        if self._advance_queued is not None and not self._advance_queued.done():
            return  # (a queued task that ended before it got the lock, failed or cancelled, does not count)
        self._advance_queued = asyncio.get_running_loop().create_task(self._advance())
        self._keep(self._advance_queued)

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
        if isinstance(self.fatal, FederationStopped):  # a terminal state, not a crash: one line, no traceback
            log.error("[RoundEngine] %s", self.fatal)
            self.failed.set()
            return
        log.error("[RoundEngine] round engine failed; stopping the coordinator (a restart resumes from the store)",
                  exc_info=self.fatal)
        self.failed.set()

    def _stopped(self, round: int, reason: str) -> FederationStopped:
        """The terminal failure of ``round``; audited once (``federation_stopped``), however often it restarts."""
        if self.store.get_meta("federation_stopped") is None:
            self._audit("federation_stopped", {"round": round, "reason": reason[:500]})
            self.store.set_meta("federation_stopped", json.dumps({"round": round, "reason": reason[:500]}))
        return FederationStopped(round, reason)

    def _notify(self, tasks: bool = True) -> None:
        """Wake whoever waits for a change of the federation's state; ``tasks=False``: a change no site's task
        depends on (an update was stored, the open round still collects), so the sites' long polls are not woken.

        Every long-polling site re-reads its offer when woken, so waking all of them for each of N updates costs
        N x N offers a round (found by ``bench/load.py``: with 200 sites this took a third of the event loop).
        """
        self._changed.set()
        self._changed = asyncio.Event()
        if tasks:
            self._tasks_changed.set()
            self._tasks_changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        """Return when the federation's state changes (update, metrics, round, control), or after ``timeout`` s."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- tasks --------------------------------------------------------------------------------------------------
    def join(self, peer: PeerIdentity, agent_version: str, lora_rank: int) -> None:
        try:
            self.require_site(peer)
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
        self.adapters.remember_rank(peer.name, rank)
        region = self.gate.region(peer)
        self.store.set_site_region(peer.name, region)
        self._audit("site_joined", {"site": peer.name, "region": region, "cert_sha256": peer.fingerprint,
                                    "serial": str(peer.serial), "agent_version": agent_version[:64], "lora_rank": rank})
        self.quorum.joined(peer.name)
        log.info("[FederationService.Join] site=%s agent=%s", peer.name, agent_version[:64])

    def _offer(self, site: str) -> TaskOffer:
        if self.control.state != "running":
            return self._held_offer(site)
        if self.finished.is_set():
            final = self.cfg.rounds + 1
            self._told_done.add(site)
            return TaskOffer("done", final, *self.adapters.adapter_meta(site, final), *self.adapters.residual_meta(final))
        cur = self.store.current_round()
        if cur is None or cur.state != "open" or cur.round in self._closing:
            return TaskOffer("wait")
        if self.store.update_trained_on(site, cur.round) is not None:
            return TaskOffer("wait")
        if self.secagg is not None and self.secagg.roster_closed(cur.round, site):  # too late to join this round's SecAgg
            return TaskOffer("wait")
        return TaskOffer("train", cur.round, *self.adapters.adapter_meta(site, cur.round),
                         *self.adapters.residual_meta(cur.round), self.quorum.deadline_ms(cur))

    def _held_offer(self, site: str) -> TaskOffer:
        """What a site gets while the administrator holds the federation: wait, or done with the latest global."""
        if self.control.state != "stopped":
            return TaskOffer("wait")
        closed = [r.round for r in self.store.rounds() if r.state == "closed"]
        latest = closed[-1] + 1 if closed else 1
        self._told_done.add(site)
        return TaskOffer("done", latest, *self.adapters.adapter_meta(site, latest), *self.adapters.residual_meta(latest))

    async def fetch_task(self, peer: PeerIdentity, wait_s: float) -> TaskOffer:
        """Long-poll: return a task as soon as one exists for this site, else ``wait`` after ``wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(wait_s, self.cfg.long_poll_ms / 1000))
        while True:
            self.require_site(peer)  # a revocation wakes this loop and ends the long-poll
            self.quorum.touch(peer.name)  # a site held in a long poll is alive
            offer = self._offer(peer.name)
            remaining = deadline - loop.time()
            if offer.status != "wait" or remaining <= 0:
                return offer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tasks_changed.wait(), remaining)

    # -- sites ------------------------------------------------------------------------------------------------
    def require_site(self, peer: PeerIdentity) -> None:
        """Refuse (PERMISSION_DENIED) a non-site, revoked or unenrolled certificate; identity is the certificate's."""
        self.gate.require_site(peer)
        self._seen[peer.name] = time.time()
        self.quorum.touch(peer.name)  # any call: alive (a silent site is back)

    def last_seen(self, site: str) -> float:
        """``time.time()`` of the site's last call (its join time from the store before any call in this process)."""
        if site not in self._seen:
            joined = {s["name"]: s["last_seen_ms"] for s in self.store.sites()}
            return joined.get(site, 0) / 1000
        return self._seen[site]

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
    def _audit_unaudited_updates(self) -> None:
        """Audit each stored update whose ``update_accepted`` record a crash cut off (the store commits an update
        before its record is appended), marked ``recovered``: after any crash the log again names every update
        the store counts, once."""
        audited = {(r["fields"].get("site"), r["fields"].get("round"), r["fields"].get("payload_sha256"))
                   for r in read_records(self.audit.path) if r["event"] == "update_accepted"}
        for u in self.store.updates():
            if (u.site, u.trained_round, u.payload_sha256) not in audited:
                self._audit("update_accepted", {"site": u.site, "round": u.trained_round,
                                                "payload_sha256": u.payload_sha256, "bytes": u.size,
                                                "num_examples": u.num_examples, "nonce": u.nonce.hex(),
                                                "recovered": True})
                log.warning("[RoundEngine.start] round=%d site=%s: the update stored before the crash had no "
                            "acceptance record; recorded it now", u.trained_round, u.site)

    def _audit(self, event: str, fields: dict[str, Any]) -> None:
        rec = self.audit.append(event, fields)
        # The head also goes to the store, so `audit verify` detects a cut-off tail even without the .head file.
        self.store.set_meta("audit_head", Head(rec["seq"], rec["hash"]).to_json())

    def _audit_many(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Audit several events with one group commit (the upload committer's batch; safe from its thread)."""
        if events:
            rec = self.audit.append_many(list(events))[-1]
            self.store.set_meta("audit_head", Head(rec["seq"], rec["hash"]).to_json())

    # -- metrics ------------------------------------------------------------------------------------------------
    def report_metrics(self, peer: PeerIdentity, round: int, phase: str, metrics: dict[str, float],
                       num_examples: int) -> None:
        self.require_site(peer)
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

    def drained(self) -> bool:
        """Finished, and every joined site still in the federation got its DONE and sent its last report: its
        evaluation of the final model, or an empty one (a site with no held-out data says it is leaving).

        Revoked sites are not waited for: they get no DONE. A site that never comes back is the server's drain
        timeout's business.
        """
        if not self.finished.is_set():
            return False
        expected = {s["name"] for s in self.store.sites()} - {r["name"] for r in self.store.revocations()}
        if self.control.state == "stopped":  # every joined site was told it is done and reported its final evaluation
            return expected <= self._final_reports
        final = self.cfg.rounds + 1
        reported = {m[1] for m in self.store.metrics(final) if m[2] == "eval_global"} | self._final_reports
        return expected <= reported
