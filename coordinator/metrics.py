"""Prometheus metrics of the coordinator, served as ``/metrics`` by the dashboard's HTTP server.

Counters are module-level (one coordinator per process) and incremented with one line where things happen: the
engine counts an accepted update where it stores it, the servicer counts a refusal where it maps a domain error to a
gRPC status, and the upload stream counts the bytes it reads. Gauges that mirror the store (current round, sites)
are read from the engine at scrape time by :class:`EngineCollector`, so they can never drift from the durable state.
Labels are bounded sets (gRPC status names, RPC names, round states): never a site's free text, never a payload.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from coordinator.rounds.engine import RoundEngine

REGISTRY = CollectorRegistry(auto_describe=True)
UPDATES_ACCEPTED = Counter("fedbridge_updates_accepted", "Site updates validated and stored durably.",
                           registry=REGISTRY)
UPDATES_REFUSED = Counter("fedbridge_updates_refused", "Site uploads refused, by the gRPC status they got.",
                          ["status"], registry=REGISTRY)
REQUESTS_REFUSED = Counter("fedbridge_requests_refused", "Refused calls of any RPC, by method and gRPC status.",
                           ["method", "status"], registry=REGISTRY)
BYTES_RECEIVED = Counter("fedbridge_upload_bytes_received", "Payload bytes received in UploadUpdate streams.",
                         registry=REGISTRY)
ADMIN_CALLS = Counter("fedbridge_admin_calls", "AdminService calls, by method and outcome (OK or a gRPC status).",
                      ["method", "status"], registry=REGISTRY)

# A site counts as connected if it called the coordinator this recently. Sites long-poll FetchTask between rounds but
# are silent while they train, so the window is generous.
SEEN_RECENTLY_S = 300.0


def refused(method: str, status: str) -> None:
    """Count one refused call of ``method`` (an RPC name) with gRPC status ``status``."""
    REQUESTS_REFUSED.labels(method, status).inc()
    if method == "UploadUpdate":
        UPDATES_REFUSED.labels(status).inc()


class EngineCollector(Collector):
    """Gauges read from the engine and its store at scrape time."""

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
        now = eng.control_state()
        for s in ("not_started", "running", "paused", "stopped", "finished"):
            state.add_metric([s], 1.0 if s == now else 0.0)
        yield state
        sites = eng.store.sites()
        yield GaugeMetricFamily("fedbridge_sites_joined", "Sites that joined the federation.", value=len(sites))
        yield GaugeMetricFamily("fedbridge_sites_connected",
                                f"Sites that called the coordinator in the last {SEEN_RECENTLY_S:.0f} s.",
                                value=sum(1 for s in sites if time.time() - eng.last_seen(s["name"]) < SEEN_RECENTLY_S))


def render(engine: RoundEngine) -> bytes:
    """The Prometheus text exposition of the module counters plus the engine's gauges."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Counters())
    reg.register(EngineCollector(engine))
    return generate_latest(reg)


class _Counters(Collector):
    def collect(self):  # type: ignore[no-untyped-def]
        yield from REGISTRY.collect()
