"""When a round closes without waiting for everyone: k-of-n quorum, deadline, abandon and retry, heartbeats, and the
late-update policy (drop, or carry into the next round with FedAsync staleness weighting).

:class:`RoundPolicy` makes these decisions for the round engine and records each one in the store (``round_events``)
and the audit log before it takes effect. Liveness (last call per site, which sites are silent, which reported their
own crash) is the only thing it keeps in memory; a restarted coordinator counts every site as heard from at its start,
so nobody is dropped at once after a restart (a failed site that stays down is then marked silent instead).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.config import FederationConfig
from coordinator.errors import LateUpdate, RoundBusy, WrongRound
from coordinator.rounds.store import RoundRow, Store, UpdateRow
from protos.fedbridge.v1 import federation_service_pb2 as pb

log = logging.getLogger(__name__)

Decision = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class HeartbeatAck:
    """What a Heartbeat answers: the round the coordinator is in, whether the site's round still takes its
    update (else the late-update policy applies to it), the deadline, and when to beat next."""

    current_round: int
    round_open: bool
    deadline_ms: int
    interval_ms: int


class RoundPolicy:
    """Decides, for the open round, whether it closes, is abandoned, which sites dropped, and where late updates go.

    Args:
        config: The federation config (``min_sites`` is the quorum k; ``quorum`` holds the rest).
        store: Durable state; every decision is recorded there.
        audit: Appends one record to the coordinator's audit log.
        closing: Rounds the engine is aggregating right now (shared with it; they take no update).
    """

    def __init__(self, config: FederationConfig, store: Store, audit: Callable[[str, dict[str, Any]], None],
                 closing: set[int]) -> None:
        self.cfg = config
        self.store = store
        self._audit = audit
        self._closing = closing
        self._started = time.time()
        self._seen: dict[str, float] = {}  # site -> last call (wall seconds)
        self._progress: dict[str, tuple[int, str, int, int]] = {}  # site -> (round, phase, step, total_steps)
        self._silent: set[str] = set()  # sites silent for longer than the heartbeat timeout (audited once each time)
        self._failed: dict[str, str] = {}  # site -> the one line it reported with ReportError, until it joins again

    def decide(self, cur: RoundRow, ups: list[UpdateRow]) -> Decision | None:
        """Whether the open round closes now, and why: ``quorum_reached``, ``deadline_passed``,
        ``all_remaining_answered`` or ``round_abandoned`` (at the deadline with too few updates); None: keep waiting.

        Only updates trained on this round count towards the quorum; late updates carried in ride along.
        """
        q, k = self.cfg.quorum, self.cfg.min_sites
        answered = sorted({u.site for u in ups if u.trained_round == cur.round})
        detail: dict[str, Any] = {"updates": len(answered), "k": k, "sites": answered}
        if len(answered) >= k:
            return "quorum_reached", detail
        missing = sorted({s["name"] for s in self.store.sites()} - set(answered))
        detail.update(missing=missing, min_to_close=self.cfg.min_to_close)
        if q.deadline_s and time.time() * 1000 >= cur.attempt_opened_ms + q.deadline_s * 1000:
            enough = len(answered) >= self.cfg.min_to_close
            return ("deadline_passed" if enough else "round_abandoned"), {**detail, "deadline_s": q.deadline_s}
        revoked = {r["name"] for r in self.store.revocations()}
        if missing and (q.heartbeat_timeout_s or self._failed or revoked & set(missing)):
            dropped = self._dropped(cur, missing, revoked)
            if len(dropped) == len(missing) and len(answered) >= self.cfg.min_to_close:
                failed = sorted(set(dropped) & set(self._failed))
                return "all_remaining_answered", {**detail, "dropped": dropped, **({"failed": failed} if failed else {})}
        return None

    def _dropped(self, cur: RoundRow, missing: list[str], revoked: set[str]) -> list[str]:
        """Sites of ``missing`` that reported a crash, were revoked (every call of theirs is refused now: waiting
        for them would only wait for the heartbeat timeout), or are silent for longer than the heartbeat timeout
        (each recorded once per round)."""
        timeout, now = self.cfg.quorum.heartbeat_timeout_s, time.time()
        known = {e["site"] for e in self.store.events(cur.round) if e["event"] == "site_dropped"}
        out = []
        for site in missing:
            silent = now - max(self._seen.get(site, self._started), self._started)
            # A failed site's own report is its record (site_failed), a revoked one's its revocation (site_revoked).
            if site in known or site in self._failed or site in revoked:
                out.append(site)
            elif timeout and silent > timeout:
                detail = {"silent_s": round(silent, 1), "heartbeat_timeout_s": timeout,
                          "last_progress": list(self._progress.get(site, ()))}
                self.store.add_event(cur.round, cur.attempt, "site_dropped", site, detail)
                self._audit("site_dropped", {"round": cur.round, "site": site, **detail})
                log.warning("[RoundEngine] round=%d site=%s dropped: silent for %.1fs", cur.round, site, silent)
                out.append(site)
        return out

    def abandon(self, cur: RoundRow, detail: dict[str, Any]) -> None:
        """Too few updates at the deadline: record the abandoned attempt and start the next one (same round, same
        input, accepted updates kept); past ``quorum.max_attempts`` stop loudly instead (the state is kept)."""
        q = self.cfg.quorum
        if q.max_attempts and cur.attempt >= q.max_attempts:
            self.store.add_event(cur.round, cur.attempt, "round_given_up", "", detail)
            self._audit("round_given_up", {"round": cur.round, "attempt": cur.attempt, **detail})
            raise RuntimeError(f"round {cur.round}: {cur.attempt} attempt(s) ended with {detail['updates']} update(s), "
                               f"fewer than {self.cfg.min_to_close}; giving up (quorum.max_attempts)")
        attempt = self.store.retry_round(cur.round, cur.attempt, detail)
        self._audit("round_abandoned", {"round": cur.round, "attempt": cur.attempt, **detail})
        log.warning("[RoundEngine] round=%d attempt=%d abandoned with %d of %d update(s); retrying as attempt %d",
                    cur.round, cur.attempt, detail["updates"], self.cfg.min_to_close, attempt)

    def deadline_ms(self, cur: RoundRow) -> int:
        q = self.cfg.quorum
        return int(cur.attempt_opened_ms + q.deadline_s * 1000) if q.deadline_s else 0

    def touch(self, site: str) -> None:
        """The site called (any RPC): it is alive; a silent site is back (audited)."""
        self._seen[site] = time.time()
        if site in self._silent:
            self._silent.discard(site)
            self._audit("site_back", {"site": site, "was": "silent"})
            log.info("[RoundEngine] site=%s is back after being silent", site)

    def joined(self, site: str) -> None:
        """The site joined (again): alive, and no longer failed (audited when it was)."""
        self.touch(site)
        if self._failed.pop(site, None) is not None:
            self._audit("site_back", {"site": site, "was": "failed"})
            log.info("[RoundEngine] site=%s joined again after it failed", site)

    def failed(self, site: str, round: int, phase: str, error: str) -> bool:
        """The site reported its own crash (ReportError): show it failed and stop waiting for it in the open round.

        One record per failure (a repeated report before the site joins again changes nothing), so a site cannot
        fill the audit log by reporting in a loop.

        Returns:
            False when the site was already failed.
        """
        self.touch(site)
        if site in self._failed:
            return False
        self._failed[site] = error
        cur = self.store.current_round()
        detail = {"trained_round": int(round), "phase": phase, "error": error}
        if cur is not None and cur.state == "open":
            self.store.add_event(cur.round, cur.attempt, "site_failed", site, detail)
        self._audit("site_failed", {"round": cur.round if cur else 0, "site": site, **detail})
        log.warning("[FederationService.ReportError] site=%s failed (round %d, %s): %s", site, round, phase, error)
        return True

    def sweep(self, sites: list[str]) -> list[str]:
        """Mark the sites of ``sites`` silent for longer than the heartbeat timeout (audited once, until they call
        again); returns the sites that went silent now."""
        timeout, now = self.cfg.quorum.heartbeat_timeout_s, time.time()
        if not timeout:
            return []
        out = []
        for site in sites:
            if site in self._silent or site in self._failed:
                continue
            silent = now - max(self._seen.get(site, self._started), self._started)
            if silent > timeout:
                self._silent.add(site)
                self._audit("site_silent", {"site": site, "silent_s": round(silent, 1), "heartbeat_timeout_s": timeout,
                                            "last_progress": list(self._progress.get(site, ()))})
                log.warning("[RoundEngine] site=%s silent for %.1fs (heartbeat timeout %.0fs)", site, silent, timeout)
                out.append(site)
        return out

    def problem(self, site: str) -> tuple[str, str]:
        """``("failed", its line)``, ``("silent", "silent for N s")`` or ``("", "")`` for a site that is fine."""
        if site in self._failed:
            return "failed", self._failed[site]
        if site in self._silent:
            silent = time.time() - max(self._seen.get(site, self._started), self._started)
            return "silent", f"no call for {silent:.0f} s (heartbeat timeout {self.cfg.quorum.heartbeat_timeout_s:g} s)"
        return "", ""

    def heartbeat(self, site: str, round: int, phase: str, step: int, total_steps: int) -> HeartbeatAck:
        """A site says it is alive and where its training is; answers whether its round still takes its update."""
        self.touch(site)
        self._progress[site] = (int(round), phase[:32], int(step), int(total_steps))
        q = self.cfg.quorum
        interval = max(200, int(q.heartbeat_timeout_s * 1000 / 3)) if q.heartbeat_timeout_s else 5000
        cur = self.store.current_round()
        if cur is None:
            return HeartbeatAck(0, False, 0, interval)
        open_ = cur.state == "open" and cur.round == round and cur.round not in self._closing
        return HeartbeatAck(cur.round, open_, self.deadline_ms(cur) if cur.state == "open" else 0, interval)

    def check(self, env: pb.UpdateEnvelope) -> int:
        """The round an update goes into: its own while that is open; under ``late_policy = "next_round"`` an
        update for a closed round goes into the open one. Refusals of late updates are recorded.

        Raises:
            WrongRound: The update is for a round that is not open and not over (a future or unknown round).
            LateUpdate: Its round closed and the policy drops it, or no later round is left to carry it.
            RoundBusy: Its round closed and the next is not open yet; the site retries (ABORTED).
        """
        cur = self.store.current_round()
        self.touch(env.site)
        if cur is not None and cur.state == "open" and cur.round not in self._closing and env.round == cur.round:
            return cur.round
        if cur is None or not 1 <= env.round <= cur.round:
            now = f"round {cur.round} is {cur.state}" if cur else "no round is open"
            raise WrongRound(f"update is for round {env.round}; {now}")
        closed = cur.round if env.round == cur.round else env.round
        if self.cfg.quorum.late_policy == "next_round":
            if cur.round > env.round and cur.state == "open" and cur.round not in self._closing:
                return cur.round
            if cur.round < self.cfg.rounds:
                raise RoundBusy(f"update for round {env.round} is late; round {cur.round} is {cur.state}: retry "
                                f"when round {cur.round + 1} opens, it will be carried into it")
            reason = f"round {closed} closed and it was the last round; no later round to carry the update into"
        else:
            reason = f"round {closed} closed before the update arrived (late_policy = drop)"
        detail = {"trained_round": env.round, "policy": self.cfg.quorum.late_policy, "reason": reason}
        self.store.add_event(closed, 0, "late_update_dropped", env.site, detail)
        self._audit("late_update_dropped", {"round": closed, "site": env.site, **detail})
        log.warning("[FederationService.UploadUpdate] round=%d site=%s late update dropped: %s", env.round, env.site,
                    reason)
        raise LateUpdate(f"late update for round {env.round} refused: {reason}")

    def route(self, env: pb.UpdateEnvelope) -> tuple[int, float, tuple[str, dict[str, Any]] | None]:
        """Where an accepted update goes: ``(round, staleness weight, event to record)`` (event None when fresh)."""
        into = self.check(env)
        if into == env.round:
            return into, 1.0, None
        staleness = into - int(env.round)
        weight = self.cfg.quorum.staleness_weight(staleness)
        detail = {"trained_round": int(env.round), "staleness": staleness, "weight": weight,
                  "staleness_exponent": self.cfg.quorum.staleness_exponent}
        log.info("[FederationService.UploadUpdate] round=%d site=%s late update carried into round %d weight=%.4f",
                 env.round, env.site, into, weight)
        return into, weight, ("late_update_carried", detail)
