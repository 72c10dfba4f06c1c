"""The site's own policy (``policy.toml``): what tasks this site accepts from its coordinator.

The coordinator sends data, never code, and every value it sends is checked here before anything trains. A task
outside the policy is refused with :class:`PolicyRefusal`, whose message names the rule; the refusal goes to the
site's :class:`AuditSink` (today a log line; the hash-chained audit log plugs in behind the same Protocol).

Example ``policy.toml``::

    allowed_base_models = ["<manifest sha256>"]
    allowed_modes = ["sft", "dpo"]
    max_steps = 200
    max_epochs = 3.0
    min_dp_noise_multiplier = 0.0
    dp_epsilon_budget = 8.0
    dp_delta = 1e-5
    max_upload_bytes = 10_000_000
    trusted_coordinator_hosts = ["fl.example.org"]
    trusted_ca_sha256 = ["<sha256 of the federation CA certificate, DER>"]
    require_secure_aggregation = false
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedcommon.certs import ca_sha256
from fedcommon.tomlconfig import load_config
from protos.fedbridge.v1 import federation_service_pb2 as pb

log = logging.getLogger(__name__)

KNOWN_MODES = ("sft", "qlora", "dpo", "kto", "orpo", "simpo")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class SitePolicy:
    """What this site accepts. The defaults accept any task (a site with no ``policy.toml``).

    Attributes:
        allowed_base_models: Manifest SHA-256 hashes of base models the site will train; empty: any.
        allowed_modes: Training modes the site will run.
        max_steps: Most optimizer steps per round (0: no limit).
        max_epochs: Most passes over the site's training rows per round, ``steps × batch × accumulation / rows``
            (0: no limit).
        min_dp_noise_multiplier: Least DP noise multiplier every upload must carry (0: DP not required). The agent
            applies the larger of its own ``[dp]`` setting and the task's request (:mod:`site_agent.egress.dp`); a task
            where that is below this floor is refused.
        dp_epsilon_budget: The site's total ε budget (site-level DP, at ``dp_delta``) over every noised update its
            privacy ledger records; the agent refuses to train a round that would exceed it, and any round without
            DP noise (0: no budget).
        dp_delta: The δ at which ε is accounted and reported (in (0, 1); keep it well below 1 / number of sites).
        max_upload_bytes: Largest update payload the site will send (0: no limit).
        trusted_coordinator_hosts: Coordinator hosts the site may dial; empty: the one in ``site.toml``.
        trusted_ca_sha256: SHA-256 fingerprints (DER, hex) of federation CA certificates the site trusts; empty:
            the one in the kit.
        require_secure_aggregation: Send an update only under secure aggregation (the coordinator sees only the
            sum); against a coordinator that does not run it the agent refuses to upload.
    """

    allowed_base_models: tuple[str, ...] = ()
    allowed_modes: tuple[str, ...] = KNOWN_MODES
    max_steps: int = 0
    max_epochs: float = 0.0
    min_dp_noise_multiplier: float = 0.0
    dp_epsilon_budget: float = 0.0
    dp_delta: float = 1e-5
    max_upload_bytes: int = 0
    trusted_coordinator_hosts: tuple[str, ...] = ()
    trusted_ca_sha256: tuple[str, ...] = ()
    require_secure_aggregation: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.allowed_modes if m not in KNOWN_MODES]
        if unknown:
            raise ValueError(f"field 'allowed_modes': {unknown[0]!r} is not one of {KNOWN_MODES}")
        for name in ("max_steps", "max_epochs", "min_dp_noise_multiplier", "dp_epsilon_budget", "max_upload_bytes"):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"field '{name}': must be a finite number >= 0, got {value}")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"field 'dp_delta': must be in (0, 1), got {self.dp_delta}")
        for name in ("allowed_base_models", "trusted_ca_sha256"):
            for i, digest in enumerate(getattr(self, name)):
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                    raise ValueError(f"field '{name}[{i}]': must be a hex SHA-256 (64 characters)")


def load_policy(path: str | Path | None) -> SitePolicy:
    """Read and check ``policy.toml``; ``None`` gives the permissive defaults."""
    return SitePolicy() if path is None else load_config(SitePolicy, path)


class PolicyRefusal(RuntimeError):
    """A task or coordinator is outside the site's policy; nothing was trained or sent.

    Attributes:
        rule: The policy field that refused (``max_steps``, ``allowed_modes``, …).
    """

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"refused by site policy rule '{rule}': {message}")


class AuditSink(Protocol):
    """Where the site records security-relevant events (refusals, uploads). Values are ids and numbers only."""

    def record(self, event: str, fields: dict[str, str | int | float]) -> None: ...


class LogAuditSink:
    """The interim sink: one log line per event. The hash-chained audit log replaces it behind :class:`AuditSink`."""

    def record(self, event: str, fields: dict[str, str | int | float]) -> None:
        level = logging.WARNING if event.endswith("_refused") else logging.INFO
        log.log(level, "[Site.Audit] event=%s %s", event, " ".join(f"{k}={v}" for k, v in sorted(fields.items())))


def upload_bytes_lower_bound(spec: pb.AdapterSpec) -> int:
    """Tensor bytes of an update of ``spec``: the payload can only be larger (the safetensors header adds to it)."""
    return sum(math.prod(t.shape) * _DTYPE_BYTES.get(t.dtype, 4) for t in spec.tensors)


def check_task(policy: SitePolicy, task: pb.Task, train_rows: int, dp_noise_multiplier: float = 0.0) -> None:
    """Refuse ``task`` unless every rule of ``policy`` allows it. Call before any training.

    Args:
        policy: The site's policy.
        task: The task as fetched.
        train_rows: How many training rows the site holds (for ``max_epochs``).
        dp_noise_multiplier: Noise multiplier the site's egress filters would apply (0: no DP).

    Raises:
        PolicyRefusal: Naming the first rule the task breaks.
    """
    t = task.training
    if policy.allowed_base_models and task.base_model_sha256 not in policy.allowed_base_models:
        raise PolicyRefusal("allowed_base_models", "the task's base model hash is not an allowed base model")
    if t.mode not in policy.allowed_modes:
        raise PolicyRefusal("allowed_modes", f"mode {t.mode!r} is not one of {policy.allowed_modes}")
    if policy.max_steps and t.max_steps > policy.max_steps:
        raise PolicyRefusal("max_steps", f"the task asks for {t.max_steps} steps, the limit is {policy.max_steps}")
    if policy.max_epochs:
        examples = t.max_steps * t.per_device_batch_size * max(1, t.gradient_accumulation_steps)
        epochs = examples / max(1, train_rows)
        if epochs > policy.max_epochs:
            raise PolicyRefusal("max_epochs", f"the task makes {epochs:.2f} passes over the site's data, the limit "
                                              f"is {policy.max_epochs}")
    if dp_noise_multiplier < policy.min_dp_noise_multiplier:
        raise PolicyRefusal("min_dp_noise_multiplier", f"updates would carry noise multiplier "
                                                       f"{dp_noise_multiplier}, the minimum is "
                                                       f"{policy.min_dp_noise_multiplier}")
    check_upload_size(policy, upload_bytes_lower_bound(task.adapter_spec))


def check_upload_size(policy: SitePolicy, size: int) -> None:
    """Refuse an upload of ``size`` bytes larger than ``max_upload_bytes`` (checked before training and again on
    the encoded payload before it is sent)."""
    if policy.max_upload_bytes and size > policy.max_upload_bytes:
        raise PolicyRefusal("max_upload_bytes", f"the update is {size} bytes, the limit is "
                                                f"{policy.max_upload_bytes}")


def check_coordinator(policy: SitePolicy, coordinator: str, ca_pem: bytes) -> None:
    """Refuse to dial ``coordinator`` (``host:port``) unless the policy trusts its host and the kit's CA.

    Raises:
        PolicyRefusal: Naming ``trusted_coordinator_hosts`` or ``trusted_ca_sha256``.
    """
    host = coordinator.rsplit(":", 1)[0].strip("[]")
    if policy.trusted_coordinator_hosts and host not in policy.trusted_coordinator_hosts:
        raise PolicyRefusal("trusted_coordinator_hosts", "the configured coordinator host is not trusted")
    if policy.trusted_ca_sha256 and ca_sha256(ca_pem) not in {d.lower() for d in policy.trusted_ca_sha256}:
        raise PolicyRefusal("trusted_ca_sha256", "the kit's CA certificate does not match a trusted fingerprint")
