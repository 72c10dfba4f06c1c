"""bench.simulate on made-up results: every row is informational, the report has each table, runs are shared."""

from __future__ import annotations

from bench import simulate
from bench.report import INFORMATIONAL


def _result(sites: int, final: float, walls: tuple[float, ...] = (30.0, 5.0, 4.0)) -> dict:
    return {"initial_loss": 8.0, "final_loss": final, "startup_s": 50.0, "total_wall_s": 100.0,
            "peak_rss_mib": 1000.0 + 10 * sites,
            "rounds": [{"round": i + 1, "wall_s": w, "heldout_loss": final + (2 - i), "sampled": sites,
                        "replied": sites, "peak_rss_mib": 1000.0} for i, w in enumerate(walls)]}


def test_cases_share_the_baseline_run_and_put_the_scaling_runs_first() -> None:
    cases = simulate.cases(10, (10, 50, 100))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) == 8  # 3 scaling + 2 more alphas + fedex + 2 more fractions
    assert cases[0].name == "n10-a1-fedavg-f1" and set(cases[0].groups) == {"scaling", "alpha", "strategy", "fraction"}
    assert [c.sites for c in cases[:3]] == [10, 100, 50]


def test_rows_are_informational_and_the_report_has_every_table() -> None:
    done = {}
    for i, c in enumerate(simulate.cases(10, (10, 50, 100))):
        done[c.name] = (c, _result(c.sites, 4.0 + 0.1 * i))
    done["broken"] = (simulate.Case("broken", ("alpha",), 10, alpha=5.0), {"error": "exit 1: error: could not start"})
    rows = simulate.build_rows(done)
    assert rows and all(r.goal.startswith(INFORMATIONAL) and r.meets_goal is None for r in rows)
    steady = [r for r in rows if r.case.startswith("scaling N=100: wall per round")]
    assert len(steady) == 1 and steady[0].ours == 4.5 and steady[0].ratio == 1.0  # rounds 2..R only
    md = simulate.report(done, {"rounds": 3, "steps": 2, "batch": 4, "rows": 8, "num_cpus": 2, "machine": "m",
                                "load": "1.0", "note": "A note."}, 12.0)
    for title in ("## Scaling", "## Held-out loss vs Dirichlet alpha", "## Naive (fedavg) vs exact",
                  "## Held-out loss vs share of sites", "## What the numbers show", "## Runs that did not finish"):
        assert title in md, title
    assert "| 100 | 50.0 | 30.0 | 4.5 | 0.04 | 2000 |" in md and "A note." in md
    assert "- broken: exit 1: error: could not start" in md
