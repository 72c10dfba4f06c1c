"""Egress guard: the last filter before anything leaves the site, whatever the training mode.

An update may carry only tensors of the round's agreed adapter spec (exact keys, shapes, dtypes, all finite), checked
on the exact payload bytes that go on the wire; metrics only from an allow-list of names, with finite values. Anything
else is refused with :class:`EgressRefusal` (the agent audits the refusal and sends nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedcommon import compress
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

# Aggregate numbers a site may report. A new metric must be added here on purpose: a free-form name could carry data.
ALLOWED_METRICS: frozenset[str] = frozenset({
    "loss", "accuracy", "tokens", "tokens_per_s", "train_time_s", "round_time_s", "upload_bytes", "steps",
    "epsilon", "epsilon_spent", "clip_fraction",
})
MAX_METRICS = 32


class EgressRefusal(RuntimeError):
    """Something was about to leave the site that the egress guard does not allow; nothing was sent.

    Attributes:
        rule: ``adapter_spec`` or ``metrics_allow_list``.
    """

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"egress guard refused ({rule}): {message}")


class EgressGuard:
    """The named egress filter. ``allowed_metrics`` defaults to :data:`ALLOWED_METRICS`."""

    name = "egress_guard"

    def __init__(self, allowed_metrics: frozenset[str] = ALLOWED_METRICS) -> None:
        self.allowed_metrics = allowed_metrics

    def check_update(self, payload: bytes, envelope: pb.UpdateEnvelope, spec: pb.AdapterSpec) -> None:
        """Refuse unless ``payload`` decodes to exactly ``spec``'s tensors (through its compression, when the spec
        names one) and ``envelope`` describes it."""
        try:
            compress.decode_update(payload, spec)  # a compressed payload must decode to exactly the spec's tensors
            codec.check_payload(envelope, payload)
        except codec.CodecError as e:
            raise EgressRefusal("adapter_spec", str(e)) from None
        if envelope.adapter_spec_sha256 != spec.sha256:
            raise EgressRefusal("adapter_spec", "the envelope names a different adapter spec than the round's")

    def check_metrics(self, metrics: Mapping[str, float]) -> None:
        """Refuse a metric name outside the allow-list, a non-finite value, or too many metrics."""
        if len(metrics) > MAX_METRICS:
            raise EgressRefusal("metrics_allow_list", f"{len(metrics)} metrics, at most {MAX_METRICS}")
        for name, value in metrics.items():
            if name not in self.allowed_metrics:
                raise EgressRefusal("metrics_allow_list", f"metric {name[:64]!r} is not on the allow-list")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EgressRefusal("metrics_allow_list", f"metric {name!r} is not a finite number")
