"""The site's differential-privacy settings, its durable ε ledger, and the budget rule of its policy.

**What is protected.** Each noised round releases the site's whole update clipped to L2 norm C plus Gaussian noise
of std σ·C (:mod:`site_agent.egress.filters`): the Gaussian mechanism on the site's contribution, i.e. **site-level**
("user-level") DP as in DP-FedAvg (McMahan et al., ICLR 2018). The unit of privacy is the site's whole dataset in a
round, not a single example. Metrics the agent reports (losses, timings) are not covered.

**Accounting.** Rényi DP with the maintained analysis of Opacus (:func:`fedcommon.dp.rdp_epsilon`: the sampled
Gaussian mechanism of Mironov, Talwar and Zhang, arXiv:1908.10530, and the RDP to (ε, δ) conversion of Balle et
al., AISTATS 2020). Each round the site trains is one Gaussian mechanism with sampling rate 1 (the site knows it took
part, so no amplification by subsampling is claimed). Opacus was chosen over ``dp-accounting`` 0.6.0 because the
latter pins ``attrs<24`` and would downgrade the pinned stack.

**Where the settings come from.** The site's own ``[dp]`` block in ``site.toml`` (:class:`SiteDpConfig`) and the
federation's request in the task (``Task.dp``) are combined into the stronger of the two: the larger noise
multiplier and the smaller positive clip bound (:func:`resolve`). The site's ``policy.toml`` sets the floor
(``min_dp_noise_multiplier``) and the budget (``dp_epsilon_budget`` at ``dp_delta``); the coordinator cannot lower
any of them.

**The ledger** (:class:`PrivacyLedger`) is a JSON file in the site's work dir, rewritten atomically and fsynced
*before* each upload, so a crash can only over-count: a retrained round after a crash is a second release and counts
again. It covers every noised update this site sent, in any federation, since the ledger was created.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedcommon.dp import rdp_epsilon
from fedcommon.durable import write_durable
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.policy import PolicyRefusal, SitePolicy

if TYPE_CHECKING:  # the filters need torch; site.toml (which holds [dp]) is read without it
    from site_agent.egress.filters import EgressFilter

LEDGER_NAME = "privacy_ledger.json"
ACCOUNTING = ("Renyi DP (Opacus RDP analysis of the sampled Gaussian mechanism, sampling rate 1 per round; RDP to "
              "(epsilon, delta) by Balle et al. 2020), site-level DP of each site's whole clipped update per round "
              "(DP-FedAvg, McMahan et al. 2018)")


@dataclass(frozen=True)
class SiteDpConfig:
    """The site's own DP settings (``[dp]`` in ``site.toml``).

    Attributes:
        noise_multiplier: σ the site applies at least, whatever the task asks (0: only what the task asks).
        clip_norm: L2 bound C on the whole update (0: the task's). Needed when ``noise_multiplier`` > 0.
        ledger: The privacy ledger file (default ``<work_dir>/privacy_ledger.json``). Keep it with the site's
            durable state: deleting it forgets spent ε.
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    ledger: Path | None = None

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"field 'dp.{name}': must be a finite number >= 0, got {value}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError("field 'dp.clip_norm': DP noise is calibrated to the clip bound; set it > 0")


@dataclass(frozen=True)
class DpSettings:
    """What the egress filters apply this round.

    Attributes:
        noise_multiplier: σ (0: no noise).
        clip_norm: C (0: no clipping).
        sample_rate: Probability the site's data takes part in a round, for the accountant (1: always).
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    sample_rate: float = 1.0

    @property
    def noised(self) -> bool:
        return self.noise_multiplier > 0

    def filters(self) -> list[EgressFilter]:
        """The egress pipeline (clip -> noise); empty when neither is set."""
        from site_agent.egress.filters import dp_filters

        return dp_filters(self.noise_multiplier, self.clip_norm) if self.clip_norm > 0 else []


def resolve(site: SiteDpConfig, requested: pb.DpRequest) -> DpSettings:
    """Combine the site's settings with the task's request into the stronger one.

    Raises:
        ValueError: Noise is asked but no clip bound is known.
    """
    sigma = max(site.noise_multiplier, requested.noise_multiplier)
    bounds = [c for c in (site.clip_norm, requested.clip_norm) if c > 0]
    clip = min(bounds) if bounds else 0.0
    if sigma > 0 and clip == 0:
        raise ValueError("the task asks for DP noise without a clip norm, and site.toml sets no dp.clip_norm")
    if not (math.isfinite(sigma) and math.isfinite(clip)):
        raise ValueError("the task's DP request is not finite")
    return DpSettings(sigma, clip)


@dataclass(frozen=True)
class LedgerEntry:
    """One noised update that left the site."""

    federation_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    payload_sha256: str
    recorded_unix_ms: int


class LedgerError(RuntimeError):
    """The ledger file is unreadable; the agent stops rather than start from zero (which would under-count)."""


class PrivacyLedger:
    """Durable, append-only record of the site's noised releases, and the ε they add up to.

    Args:
        path: The ledger file (created on first record).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: list[LedgerEntry] = []
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self._entries = [LedgerEntry(**e) for e in raw["entries"]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LedgerError(f"{self.path}: privacy ledger is unreadable ({e}); refusing to start from zero "
                                  "epsilon. Restore it from backup.") from None

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, 1) for e in self._entries]

    def epsilon(self, delta: float, next_round: DpSettings | None = None) -> float:
        """Cumulative ε at ``delta`` of everything recorded, plus ``next_round`` if given (a projection)."""
        extra = [(next_round.noise_multiplier, next_round.sample_rate, 1)] if next_round else []
        return rdp_epsilon(self.history() + extra, delta)

    def record(self, federation_id: str, round: int, settings: DpSettings, payload_sha256: str) -> None:
        """Add one release and make it durable (call before the upload). Re-recording the same payload is a no-op."""
        if any(e.federation_id == federation_id and e.round == round and e.payload_sha256 == payload_sha256
               for e in self._entries):
            return
        entry = LedgerEntry(federation_id, int(round), float(settings.noise_multiplier), float(settings.sample_rate),
                            payload_sha256, int(time.time() * 1000))
        data = json.dumps({"version": 1, "accounting": ACCOUNTING,
                           "entries": [asdict(e) for e in [*self._entries, entry]]}, indent=1)
        write_durable(self.path, data.encode())
        self._entries.append(entry)


def check_budget(policy: SitePolicy, ledger: PrivacyLedger, settings: DpSettings) -> float:
    """Refuse a round that would take the site's ε past its budget; returns the projected ε (∞ without noise).

    Call before training. With no budget in the policy (``dp_epsilon_budget = 0``) nothing is refused.

    Raises:
        PolicyRefusal: Rule ``dp_epsilon_budget``.
    """
    projected = ledger.epsilon(policy.dp_delta, settings) if settings.noised else math.inf
    if policy.dp_epsilon_budget > 0 and projected > policy.dp_epsilon_budget:
        spent = ledger.epsilon(policy.dp_delta)
        why = ("the update would carry no DP noise (epsilon is unbounded)" if not settings.noised else
               f"this round would bring the site's epsilon to {projected:.4g} at delta={policy.dp_delta:g}")
        raise PolicyRefusal("dp_epsilon_budget", f"{why}; the budget is {policy.dp_epsilon_budget:g} and "
                                                 f"{spent:.4g} is spent over {len(ledger.entries)} noised update(s)")
    return projected
