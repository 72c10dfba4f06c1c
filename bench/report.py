"""Shared output of the benchmarks: a markdown table on stdout and ``bench/results/<name>.json``.

Schema: ``{"bench": name, "rows": [{"case", "ours", "reference", "ratio", "unit", "goal", "meets_goal"}], "machine":
platform string, "notes": [str]}`` (one :class:`Row` per case).

A row either has a goal, and then ``meets_goal`` is computed from its numbers (true or false), or it is information
only: its goal reads "informational" (optionally with a reason in parentheses) and ``meets_goal`` is None. A row
cannot claim ``meets_goal: true`` without a goal; :class:`Row` refuses to be built that way.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INFORMATIONAL = "informational"  # the goal of a row that is information only (meets_goal None)


@dataclass(frozen=True)
class Row:
    case: str
    ours: float
    reference: float
    ratio: float
    unit: str
    goal: str
    meets_goal: bool | None  # None: an informational row ("goal": "informational"), which cannot fail

    def __post_init__(self) -> None:
        informational = self.goal.startswith(INFORMATIONAL)
        if informational != (self.meets_goal is None):
            raise ValueError(f"bench row {self.case!r}: goal {self.goal!r} with meets_goal {self.meets_goal!r}; a row "
                             f"without a goal reads {INFORMATIONAL!r} and has meets_goal None, a row with a goal "
                             "computes meets_goal")
        if self.meets_goal is not None:  # a numpy or torch comparison gives its own bool type: store a plain bool
            object.__setattr__(self, "meets_goal", bool(self.meets_goal))


def write_results(bench: str, rows: list[Row], notes: list[str] | None = None) -> Path:
    """Print the rows as a markdown table and write the JSON results file; returns its path."""
    print(f"\n### {bench}\n")
    print("| case | ours | reference | ratio | unit | goal | meets goal |")
    print("|---|---:|---:|---:|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {r.ours:.6g} | {r.reference:.6g} | {r.ratio:.4f} | {r.unit} | {r.goal} | "
              f"{'n/a' if r.meets_goal is None else 'yes' if r.meets_goal else 'NO'} |")
    for n in notes or []:
        print(f"\n{n}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.json"
    path.write_text(json.dumps({"bench": bench, "rows": [asdict(r) for r in rows],
                                "machine": platform.platform(), "notes": notes or []}, indent=1) + "\n")
    print(f"\nwrote {path}")
    return path
