"""The release gate: a merged model is published only if every gated benchmark is at or above its threshold and has
not dropped by more than the tolerance against the last published version.

:func:`decide` is pure. :func:`last_published` reads the baseline from the registry
(``<registry>/<federation>/v<N>/provenance.json``), so the comparison spans coordinator runs: a federation resumed
or rebuilt later is held against what users already have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Check:
    """One gated benchmark's verdict."""

    benchmark: str
    score: float | None
    threshold: float
    previous: float | None
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one candidate.

    Attributes:
        passed: Publish or not.
        reason: Why not (empty when passed); one line naming every failed check.
        checks: One entry per gated benchmark.
        previous_version: The published version compared against (None if there is none).
    """

    passed: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    previous_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(scores: dict[str, float] | None, thresholds: dict[str, float], max_regression: float,
           previous: tuple[int, dict[str, float]] | None = None, evaluation_error: str = "") -> GateDecision:
    """Judge a candidate.

    Args:
        scores: Primary score per benchmark of the candidate (None: not evaluated).
        thresholds: Minimum score per gated benchmark; no thresholds means no gate.
        max_regression: Largest allowed drop of a gated score against ``previous`` (absolute).
        previous: ``(version, scores)`` of the last published version, if any.
        evaluation_error: Why the candidate has no scores, if its evaluation failed.

    Returns:
        The decision; a regression is only checked where the previous version has that benchmark's score.
    """
    prev_version, prev_scores = previous if previous else (None, {})
    if not thresholds:
        return GateDecision(True, "", [], prev_version)
    if scores is None:
        why = f"evaluation failed: {evaluation_error}" if evaluation_error else "the candidate was not evaluated"
        return GateDecision(False, f"no scores for gated benchmarks {sorted(thresholds)}: {why}", [], prev_version)
    checks = []
    for name, threshold in sorted(thresholds.items()):
        score, before = scores.get(name), prev_scores.get(name)
        if score is None:
            checks.append(Check(name, None, threshold, before, False, f"{name}: no score"))
        elif score < threshold:
            checks.append(Check(name, score, threshold, before, False, f"{name}: {score:.4f} < threshold {threshold:.4f}"))
        elif before is not None and before - score > max_regression:
            checks.append(Check(name, score, threshold, before, False,
                                f"{name}: {score:.4f} regressed by {before - score:.4f} from v{prev_version}'s "
                                f"{before:.4f} (tolerance {max_regression:.4f})"))
        else:
            checks.append(Check(name, score, threshold, before, True))
    failed = [c.reason for c in checks if not c.passed]
    return GateDecision(not failed, "; ".join(failed), checks, prev_version)


def last_published(fed_dir: Path) -> tuple[int, dict[str, float]] | None:
    """``(version, primary scores)`` of the newest version in ``<registry>/<federation>``, or None.

    A version published without evaluation gives an empty score table (nothing to regress from).
    """
    versions = sorted((int(p.name[1:]), p) for p in Path(fed_dir).glob("v*") if p.name[1:].isdigit() and p.is_dir())
    if not versions:
        return None
    version, path = versions[-1]
    try:
        prov = json.loads((path / "provenance.json").read_text())
    except (OSError, ValueError):
        return version, {}
    scores = (prov.get("evaluation") or {}).get("scores") or {}
    return version, {k: float(v) for k, v in scores.items()}
