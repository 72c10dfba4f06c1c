"""Prometheus gauges read from the engine and its store at scrape time, and the ``/metrics`` exposition.

The counters live in :mod:`coordinator.metrics`, which imports nothing of the engine (the engine's parts count
into it); this module is the one that reads the engine, so the dependency points one way only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.metrics import REGISTRY, SEEN_RECENTLY_S

if TYPE_CHECKING:
    from coordinator.rounds.engine import RoundEngine


class EngineCollector(Collector):
    """Gauges read from the engine and its store at scrape time, so they can never drift from the durable state."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        eng = self.engine
        cur = eng.store.current_round()
        yield GaugeMetricFamily("fedbridge_round", "The current round (0 before the first).",
                                value=cur.round if cur else 0)
        yield GaugeMetricFamily("fedbridge_rounds_total_configured", "Rounds the federation is configured to run.",
                                value=eng.cfg.rounds)
        yield GaugeMetricFamily("fedbridge_round_updates", "Accepted updates in the current round.",
                                value=len(eng.store.updates(cur.round)) if cur else 0)
        state = GaugeMetricFamily("fedbridge_federation_state", "1 for the federation's control state.",
                                  labels=["state"])
        now = eng.control.control_state()
        for s in ("not_started", "running", "paused", "stopped", "finished"):
            state.add_metric([s], 1.0 if s == now else 0.0)
        yield state
        sites = eng.store.sites()
        yield GaugeMetricFamily("fedbridge_sites_joined", "Sites that joined the federation.", value=len(sites))
        yield GaugeMetricFamily("fedbridge_sites_connected",
                                f"Sites that called the coordinator in the last {SEEN_RECENTLY_S:.0f} s.",
                                value=sum(1 for s in sites if time.time() - eng.last_seen(s["name"]) < SEEN_RECENTLY_S))
        problems = GaugeMetricFamily("fedbridge_sites_down", "Sites that reported their own crash (failed) or are "
                                     "silent past the heartbeat timeout.", labels=["state"])
        kinds = [eng.quorum.problem(s["name"])[0] for s in sites]
        for k in ("failed", "silent"):
            problems.add_metric([k], float(kinds.count(k)))
        yield problems


def render(engine: RoundEngine) -> bytes:
    """The Prometheus text exposition of the module counters plus the engine's gauges."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Counters())
    reg.register(EngineCollector(engine))
    return generate_latest(reg)


class _Counters(Collector):
    def collect(self):  # type: ignore[no-untyped-def]
        yield from REGISTRY.collect()
