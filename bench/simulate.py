"""Simulation at scale: ``fedbridge simulate`` swept over sites N, Dirichlet α, naive vs exact LoRA aggregation, and
the share of sites sampled per round.

Each case is one ``fedbridge simulate`` run in its own process (its own local Ray, started and shut down by the run)
with the tiny model and few local steps. Scaling: N = 10, 50, 100 (wall time per round, start-up, peak RSS of the
driver and its Ray processes). Quality (union held-out loss after R rounds): vs N (the scaling runs), vs α at N =
``--quality-sites``, fedavg (naive: A and B averaged apart) vs fedex-lora (exact), and vs the sampled fraction.

Writes ``bench/results/simulate.json`` (:mod:`bench.report` rows, all informational) after every case, so an
interrupted sweep keeps what it measured, and ``bench/results/simulate.md`` (the tables and what they show).

    .venv/bin/python -m bench.simulate                      # the whole sweep (tens of minutes on a busy 2-core box)
    .venv/bin/python -m bench.simulate --only scaling       # one group: scaling, alpha, strategy, fraction
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import INFORMATIONAL, RESULTS, Row, write_results

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    """One simulation of the sweep."""

    name: str
    groups: tuple[str, ...]  # the tables it belongs to
    sites: int
    alpha: float = 1.0
    strategy: str = "fedavg"
    fraction: float = 1.0

    def args(self) -> list[str]:
        return ["--sites", str(self.sites), "--alpha", str(self.alpha), "--strategy", self.strategy,
                "--fraction", str(self.fraction)]


def cases(quality_sites: int, scaling: tuple[int, ...]) -> list[Case]:
    """The sweep: each distinct run once, tagged with every table it serves."""
    out: dict[tuple[int, float, str, float], set[str]] = {}

    def add(group: str, sites: int, alpha: float = 1.0, strategy: str = "fedavg", fraction: float = 1.0) -> None:
        out.setdefault((sites, alpha, strategy, fraction), set()).add(group)

    # The scaling runs first (smallest N, which every quality table shares, then the largest), then the quality runs,
    # whose tables compare losses only: a sweep cut short on a busy machine still has the scaling table.
    for n in sorted(scaling, key=lambda n: (n != min(scaling), -n)):
        add("scaling", n)
    for a in (0.1, 1.0, 100.0):
        add("alpha", quality_sites, alpha=a)
    for s in ("fedavg", "fedex-lora"):
        add("strategy", quality_sites, strategy=s)
    for f in (0.1, 0.5, 1.0):
        add("fraction", quality_sites, fraction=f)
    return [Case(f"n{n}-a{a:g}-{s}-f{f:g}", tuple(sorted(g)), n, a, s, f) for (n, a, s, f), g in out.items()]


def run_case(case: Case, common: list[str], work: Path, timeout_s: float, resume: bool = False) -> dict[str, Any]:
    """One ``fedbridge simulate`` process; its results.json (or an ``error`` entry).

    With ``resume``, a case whose folder under ``work`` already holds a results.json (a finished run of the same
    settings: the folder is named by them, and ``common`` must be the same) is read instead of run again.
    """
    out = work / case.name
    if resume and (out / "results.json").is_file():
        res = json.loads((out / "results.json").read_text())
        print(f"[simulate-bench] {case.name}: kept from an earlier sweep ({out / 'results.json'})", file=sys.stderr)
        return res
    cmd = [sys.executable, "-m", "sandbox", "simulate", *case.args(), *common, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    start = time.perf_counter()
    print(f"[simulate-bench] {case.name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    (work / f"{case.name}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"}
    res = json.loads((out / "results.json").read_text())
    res["process_wall_s"] = time.perf_counter() - start
    print(f"[simulate-bench] {case.name}: final loss {res['final_loss']:.4f}, {res['process_wall_s']:.0f} s",
          file=sys.stderr, flush=True)
    return res


def steady_round_s(res: dict[str, Any]) -> float:
    """Mean wall of rounds 2..R (round 1 also starts each Ray worker's sites: every model load and dataset)."""
    walls = [r["wall_s"] for r in res["rounds"]]
    return sum(walls[1:]) / len(walls[1:]) if len(walls) > 1 else walls[0]


def build_rows(done: dict[str, tuple[Case, dict[str, Any]]]) -> list[Row]:
    """Information rows: scaling figures against N = smallest, losses against the initial adapter's."""
    rows: list[Row] = []
    ok = {k: v for k, v in done.items() if "error" not in v[1]}
    scaling = sorted((c for c, _ in ok.values() if "scaling" in c.groups), key=lambda c: c.sites)
    if scaling:
        ref = ok[scaling[0].name][1]
        for c in scaling:
            r = ok[c.name][1]
            for what, key, unit in (("wall per round, rounds 2..R", steady_round_s, "s"),
                                    ("round 1 wall (first model loads)", lambda x: x["rounds"][0]["wall_s"], "s"),
                                    ("start-up (Ray, data, eval model)", lambda x: x["startup_s"], "s"),
                                    ("peak RSS, driver + Ray processes", lambda x: x["peak_rss_mib"], "MiB")):
                ours, base = key(r), key(ref)
                rows.append(Row(f"scaling N={c.sites}: {what} (reference: N={scaling[0].sites})", ours, base,
                                ours / base if base else float("nan"), unit, f"{INFORMATIONAL} (scaling)", None))
    for c, r in sorted(ok.values(), key=lambda v: v[0].name):
        rows.append(Row(f"held-out loss after {len(r['rounds'])} rounds: N={c.sites} alpha={c.alpha:g} {c.strategy} "
                        f"fraction={c.fraction:g} (reference: initial adapter)", r["final_loss"], r["initial_loss"],
                        r["final_loss"] / r["initial_loss"], "nats/token", f"{INFORMATIONAL} (quality)", None))
    return rows


def _loss(done: dict[str, tuple[Case, dict[str, Any]]], **match: Any) -> float | None:
    for c, r in done.values():
        if "error" not in r and all(getattr(c, k) == v for k, v in match.items()):
            return float(r["final_loss"])
    return None


def report(done: dict[str, tuple[Case, dict[str, Any]]], settings: dict[str, Any], wall_s: float) -> str:
    """The markdown report: the scaling table, the quality tables, and what the numbers show (computed here)."""
    ok = {k: v for k, v in done.items() if "error" not in v[1]}
    note = f" {settings['note']}" if settings.get("note") else ""
    lines = ["# Simulation at scale (`fedbridge simulate`, Flower simulation engine on Ray)", "",
             f"Settings: {settings['rounds']} rounds x {settings['steps']} local steps, batch {settings['batch']}, "
             f"{settings['rows']} train rows per site on average, tiny Llama base, LoRA r=8 all-linear, "
             f"local Ray with {settings['num_cpus']} CPUs and 1 CPU per virtual site (so 2 sites train at a time); "
             f"held-out loss is the global adapter's on the union held-out set (every fact family, "
             f"token-weighted). The runs took {sum(v[1]['total_wall_s'] for v in ok.values()):.0f} s together on "
             f"`{settings['machine']}` (load average when the report was built {settings['load']}).{note}", ""]
    scaling = sorted((v for v in ok.values() if "scaling" in v[0].groups), key=lambda v: v[0].sites)
    if scaling:
        lines += ["## Scaling (fedavg, alpha 1, every site every round)", "",
                  "| N | start-up (s) | round 1 (s) | rounds 2..R, mean (s) | per site-round, rounds 2..R (s) | "
                  "peak RSS (MiB) | held-out loss after R | total (s) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c, r in scaling:
            steady = steady_round_s(r)
            lines.append(f"| {c.sites} | {r['startup_s']:.1f} | {r['rounds'][0]['wall_s']:.1f} | {steady:.1f} | "
                         f"{steady / c.sites:.2f} | {r['peak_rss_mib']:.0f} | {r['final_loss']:.4f} | "
                         f"{r['total_wall_s']:.0f} |")
        lines.append("")
    for group, title, col in (("alpha", "Held-out loss vs Dirichlet alpha", "alpha"),
                              ("strategy", "Naive (fedavg) vs exact (fedex-lora) LoRA aggregation", "strategy"),
                              ("fraction", "Held-out loss vs share of sites sampled per round", "fraction")):
        rows = sorted((v for v in ok.values() if group in v[0].groups), key=lambda v: str(getattr(v[0], col)))
        if not rows:
            continue
        lines += [f"## {title} (N = {rows[0][0].sites})", "",
                  f"| {col} | held-out loss, initial | after round 1 | after R | sites per round |",
                  "|---|---:|---:|---:|---:|"]
        for c, r in rows:
            lines.append(f"| {getattr(c, col)} | {r['initial_loss']:.4f} | {r['rounds'][0]['heldout_loss']:.4f} | "
                         f"{r['final_loss']:.4f} | {r['rounds'][0]['sampled']} |")
        lines.append("")
    lines += findings(ok)
    failed = [(k, v[1]["error"]) for k, v in done.items() if "error" in v[1]]
    if failed:
        lines += ["## Runs that did not finish", ""] + [f"- {k}: {e}" for k, e in failed] + [""]
    return "\n".join(lines)


def findings(ok: dict[str, tuple[Case, dict[str, Any]]]) -> list[str]:
    """What the tables show, in words computed from them (comparisons only; one seed, so small gaps are noise)."""
    out = []
    scaling = sorted((v for v in ok.values() if "scaling" in v[0].groups), key=lambda v: v[0].sites)
    if len(scaling) > 1:
        (c0, r0), (c1, r1) = scaling[0], scaling[-1]
        out.append(f"- Scaling: from N={c0.sites} to N={c1.sites} ({c1.sites / c0.sites:g}x the sites, all trained every "
                   f"round), the mean wall of rounds 2..R goes from {steady_round_s(r0):.1f} s to "
                   f"{steady_round_s(r1):.1f} s ({steady_round_s(r1) / steady_round_s(r0):.1f}x; "
                   f"{steady_round_s(r0) / c0.sites:.2f} -> {steady_round_s(r1) / c1.sites:.2f} s per site-round), "
                   f"round 1 from {r0['rounds'][0]['wall_s']:.0f} s to {r1['rounds'][0]['wall_s']:.0f} s, and the "
                   f"peak RSS from {r0['peak_rss_mib']:.0f} to {r1['peak_rss_mib']:.0f} MiB.")
    for group, col, label in (("alpha", "alpha", "alpha"), ("strategy", "strategy", "aggregation"),
                              ("fraction", "fraction", "sampled fraction")):
        rows = sorted((v for v in ok.values() if group in v[0].groups), key=lambda v: str(getattr(v[0], col)))
        if len(rows) > 1:
            parts = ", ".join(f"{getattr(c, col)}: {r['final_loss']:.3f}" for c, r in rows)
            best = min(rows, key=lambda v: v[1]["final_loss"])
            worst = max(rows, key=lambda v: v[1]["final_loss"])
            gap = worst[1]["final_loss"] / best[1]["final_loss"] - 1
            out.append(f"- Held-out loss after R rounds by {label} (N={rows[0][0].sites}): {parts}; lowest at "
                       f"{getattr(best[0], col)}, highest at {getattr(worst[0], col)} ({100 * gap:.1f}% higher).")
    if out:
        out = ["## What the numbers show", "", *out,
               "- One data/adapter/training seed per case, so differences of a few percent are within seed noise; "
               "3 rounds x 2 steps is the very start of training.",
               "- Cases whose held-out loss rose in a round: " + (", ".join(
                   f"{c.name} (round {r2['round']})" for c, r in ok.values()
                   for r1, r2 in zip(r["rounds"], r["rounds"][1:], strict=False) if r2["heldout_loss"] > r1["heldout_loss"])
                   or "none") + ".", ""]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rows-per-site", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--scaling", default="10,50,100", help="comma-separated N of the scaling table")
    p.add_argument("--quality-sites", type=int, default=10, help="N of the alpha, strategy and fraction tables")
    p.add_argument("--only", default="", help="comma-separated groups: scaling, alpha, strategy, fraction")
    p.add_argument("--work", type=Path, default=Path("/tmp/fedbridge-simulate-bench"))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    p.add_argument("--resume", action="store_true", help="keep the cases --work already has results for")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the JSON and the report from the cases --work has results for")
    p.add_argument("--note", default="", help="a sentence for the report's settings paragraph (how it was run)")
    a = p.parse_args(argv)
    todo = cases(a.quality_sites, tuple(int(x) for x in a.scaling.split(",")))
    if a.only:
        todo = [c for c in todo if set(c.groups) & set(a.only.split(","))]
    common = ["--rounds", str(a.rounds), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
              "--rows-per-site", str(a.rows_per_site), "--num-cpus", str(a.num_cpus)]
    a.work.mkdir(parents=True, exist_ok=True)
    import platform

    settings = {"rounds": a.rounds, "steps": a.steps, "batch": a.batch_size, "rows": a.rows_per_site,
                "num_cpus": a.num_cpus, "machine": f"{platform.platform()}, {os.cpu_count()} cores",
                "load": ", ".join(f"{x:.1f}" for x in os.getloadavg()), "note": a.note}
    start = time.perf_counter()
    done: dict[str, tuple[Case, dict[str, Any]]] = {}
    if a.report_only:
        todo = [c for c in todo if (a.work / c.name / "results.json").is_file()]
    for case in todo:
        done[case.name] = (case, run_case(case, common, a.work, a.timeout, a.resume or a.report_only))
        wall = time.perf_counter() - start
        notes = [f"case {k}: {v[1]['error']}" for k, v in done.items() if "error" in v[1]]
        write_results("simulate", build_rows(done), [report(done, settings, wall).split("\n\n", 2)[1], *notes])
        (RESULTS / "simulate.md").write_text(report(done, settings, wall) + "\n")


if __name__ == "__main__":
    main()
