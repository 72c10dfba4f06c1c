"""Administration of a running federation (AdminService): control state, publish now, withdraw a site.

:class:`AdminControl` owns the administrator's control state (durable in store meta ``control``); the round engine
wires it in and asks it whether rounds may advance. Every action is audited before it takes effect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from coordinator import errors
from coordinator.config import FederationConfig
from coordinator.privacy.central_dp import CentralDp
from coordinator.release import withdraw
from coordinator.rounds.adapter import base_layout
from coordinator.rounds.store import Store
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.registry import BatchStrategy, StreamingStrategy

log = logging.getLogger(__name__)

Audit = Callable[[str, dict[str, Any]], None]


class AdminControl:
    """Start/pause/resume/stop (durable in the store), publish the latest global now, withdraw a site.

    The control state lives in store meta "control": not_started | running | paused | stopped. It survives a
    restart; "finished" is derived (every round ran and the release was decided, or the federation was stopped).

    Args:
        config: The federation config.
        store: Durable state.
        base_sha256: Manifest hash of the base model (recorded in a rebuilt version's provenance).
        spec: The federation's adapter spec.
        strategy: The aggregation rule (a withdrawal re-aggregates with it).
        site_rank: The LoRA rank a site trains.
        spec_for: The adapter spec a site trains (how its stored, possibly compressed, updates decode).
        central_dp: Central differential privacy, when configured (a withdrawal privatizes the same way).
        secure_aggregation: Whether the federation runs secure aggregation (no withdrawal is then possible).
        lock: The engine's lock: no round step runs while a publication or a rebuild does.
        finished: Set once the federation is finished (stopping sets it).
        publish: Runs the release gate on a round's output and publishes it or records why not (worker thread).
        advance: Makes progress in the background (after start or resume).
        audit: Appends an event to the audit log.
        notify: Wakes everyone waiting on a change of the federation's state.
    """

    def __init__(self, config: FederationConfig, store: Store, base_sha256: str, *, spec: pb.AdapterSpec,
                 strategy: StreamingStrategy | BatchStrategy, site_rank: Callable[[str], int],
                 spec_for: Callable[[str], pb.AdapterSpec] | None = None,
                 central_dp: CentralDp | None, secure_aggregation: bool, lock: asyncio.Lock, finished: asyncio.Event,
                 publish: Callable[[int], None], advance: Callable[[], None], audit: Audit,
                 notify: Callable[[], None]) -> None:
        self.cfg = config
        self.store = store
        self.base_sha256 = base_sha256
        self.spec = spec
        self.strategy = strategy
        self.site_rank = site_rank
        self.spec_for = spec_for
        self.central_dp = central_dp
        self.secure_aggregation = secure_aggregation
        self._lock = lock
        self.finished = finished
        self._publish = publish
        self._advance_in_background = advance
        self._audit = audit
        self._notify = notify
        self._control = "running"  # until load() reads the durable state at start

    def load(self) -> None:
        """Read the durable control state (first start: ``running``, or ``not_started`` without ``autostart``)."""
        if self.store.get_meta("control") is None:
            self.store.set_meta("control", "running" if self.cfg.autostart else "not_started")
        self._control = self.store.get_meta("control") or "running"

    @property
    def state(self) -> str:
        """The stored control state: ``not_started``, ``running``, ``paused`` or ``stopped``."""
        return self._control

    def control_state(self) -> str:
        """``not_started``, ``running``, ``paused``, ``stopped``, or ``finished``."""
        return "finished" if self._control == "running" and self.finished.is_set() else self._control

    def held(self) -> bool:
        """Rounds must not advance now (not started, paused or stopped). A stopped federation is finished."""
        if self._control == "stopped":
            self.finished.set()
        return self._control != "running"

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
        the other sites' stored updates (:func:`coordinator.release.withdraw.rebuild_without`, whose docstring says what this
        cannot remove: the other sites trained later rounds from globals the site had influenced). The new version's
        provenance and model card name the withdrawn site and the first rebuilt round. The release gate applies; when
        shared evaluation is configured the rebuilt model is evaluated first.

        Returns:
            ``{"site", "from_round", "to_round", "published", "version", "path", "global_sha256", "blocked_reason"}``.
        """
        if self.secure_aggregation:
            raise errors.InvalidState(
                "this federation runs secure aggregation: the coordinator holds only masked updates, whose masks cancel "
                "only over a round's whole set of sites, so no round can be re-aggregated without one site; removing "
                "its contribution would need the remaining sites to retrain")
        self._audit("admin_action", {"action": "withdraw_site", "actor": actor, "site": site, "reason": reason[:500]})
        async with self._lock:
            fan_in_fan_out = (await asyncio.to_thread(base_layout, self.cfg.base_model)).fan_in_fan_out
            rb = await asyncio.to_thread(withdraw.rebuild_without, self.store, self.strategy, site,
                                         site_rank=self.site_rank, spec_for=self.spec_for,
                                         lora_scale=self.spec.alpha / self.spec.rank,
                                         progress=progress,
                                         privatize=self.central_dp.privatize if self.central_dp is not None else None,
                                         fan_in_fan_out=fan_in_fan_out)
            log.info("[AdminService.WithdrawSite] site=%s rounds=%d..%d rebuilt actor=%s", site, rb.from_round,
                     rb.to_round, actor)
            out = await asyncio.to_thread(withdraw.publish_rebuild, self.cfg, self.store, rb, base_sha256=self.base_sha256,
                                          spec=self.spec, strategy=self.strategy.name, reason=reason, actor=actor)
            self._notify()
        return out
