"""Prometheus metrics of the coordinator, served as ``/metrics`` by the dashboard's HTTP server.

Counters are module-level (one coordinator per process) and incremented with one line where things happen: the
engine counts an accepted update where it stores it, the servicer counts a refusal where it maps a domain error to a
gRPC status, and the upload stream counts the bytes it reads. Gauges that mirror the store (current round, sites)
are read from the engine at scrape time by :class:`coordinator.dashboard.collector.EngineCollector`, so they can never
drift from the durable state; this module imports nothing of the engine, whose parts count into it.
Labels are bounded sets (gRPC status names, RPC names, round states): never a site's free text, never a payload.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

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
