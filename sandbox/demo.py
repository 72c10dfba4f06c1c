"""The demo: a coordinator and N site agents as separate processes on loopback, with a dev CA made on the spot.

Each site holds its own synthetic, non-IID private data (a different fact family per site) plus a held-out split.
The demo watches the coordinator's store (read-only), shows progress bars, prints a table per round, and ends with
the published model's path and model card. Sites report only aggregate metrics; the per-round "union" loss is the
token-weighted mean of the sites' held-out losses of the round's global adapter. The coordinator also scores each
round's merged model with EvalScope on a generated shared benchmark that asks about every site's facts
(:mod:`sandbox.benchmarks`), and publishes only if the release gate passes.

What federation buys is shown against a baseline: beside the federation, each site's data also trains a local-only
model (:mod:`sandbox.local_only`: the same task, rounds x local steps, LoRA spec, learning rate and seed, through the
site agent's own trainer, on that site's data alone). The final table scores the federated model and every
local-only one on each site's held-out task and on their union; ``results.json`` in the work folder holds the same
numbers.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.release.evaluation import is_due
from fedcommon.durable import write_durable
from sandbox import localfed
from sandbox.tiny_model import build_tiny_model


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo run.

    Attributes:
        workdir: Where PKI, data, state, logs and the registry go (wiped first).
        sites: Number of site processes (1-5).
        rounds: Federated rounds.
        steps: Local optimizer steps per round.
        learning_rate: Local learning rate.
        rank: LoRA rank.
        timeout_s: Give up (and stop every process) after this long.
        eval_every: Shared EvalScope evaluation after every k-th round (and always the last); 0 turns it off.
        gate_qa: Release gate: minimum general_qa score (Rouge-L recall) of the final model.
        base_model: A local Hugging Face base model directory to federate instead of the house tiny model (any
            causal LM; a ``fedbridge-manifest.json`` is not needed, the coordinator hashes the model files).
        chat_template: A Jinja chat template file for a base that ships none (``[model] chat_template``).
        baseline: Also train each site's local-only model (the same task on its own data alone) beside the
            federation and compare; it doubles the training work (off: today's federated-only run).
    """

    workdir: Path = Path("demo-run")
    sites: int = 3
    rounds: int = 4
    steps: int = 30
    learning_rate: float = 2e-3
    rank: int = 16
    timeout_s: float = 600.0
    eval_every: int = 1
    gate_qa: float = 0.5
    base_model: Path | None = None
    chat_template: Path | None = None
    baseline: bool = True

    def __post_init__(self) -> None:
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            raise ValueError(f"--base-model {self.base_model}: not a model directory (no config.json)")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"--chat-template {self.chat_template}: no such file")
        if self.chat_template is not None:  # refused here, before the demo wipes its folder and starts processes
            from jinja2 import TemplateSyntaxError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            try:
                ImmutableSandboxedEnvironment().parse(Path(self.chat_template).read_text(errors="replace"))
            except TemplateSyntaxError as e:
                raise ValueError(f"--chat-template {self.chat_template}: line {e.lineno}: not valid Jinja: "
                                 f"{e.message}") from None
        if not 1 <= self.sites <= 5:
            raise ValueError(f"sites must be 1..5, got {self.sites}")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("rounds and steps must be >= 1")


@dataclass(frozen=True)
class RoundView:
    """What the store says about one round."""

    round: int
    state: str
    uploaded: dict[str, float]  # site -> train loss (nan until its metrics arrive)
    heldout: dict[str, tuple[float, float]]  # site -> (loss, tokens) of this round's OUTPUT global adapter
    aggregation_error: float  # mean over LoRA modules of ||mean(B_i A_i) - B A|| / ||mean(B_i A_i)|| (nan if open)
    shared: dict[str, float]  # benchmark -> primary score of this round's output (EvalScope); empty if not evaluated
    eval_status: str  # "ok", "failed: <why>", or "" while not (yet) evaluated
    decisions: tuple[str, ...] = ()  # quorum/deadline/drop/abandon/late-update decisions, in words


@dataclass(frozen=True)
class Releases:
    """Publications and blocked publications recorded by the coordinator."""

    published: list[str]
    blocked: list[str]  # the gate's reasons


def read_store(db: Path, n_rounds: int) -> tuple[list[RoundView], dict[str, tuple[float, float]], Releases]:
    """Rounds, held-out losses of the initial adapter, and releases, from the coordinator's SQLite."""
    if not db.exists():
        return [], {}, Releases([], [])
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rounds = con.execute("SELECT round, state, info FROM rounds ORDER BY round").fetchall()
        ups = con.execute("SELECT round, site FROM updates").fetchall()
        mets = con.execute("SELECT round, site, phase, key, value FROM metrics").fetchall()
        pubs = [r[0] for r in con.execute("SELECT path FROM publications ORDER BY version")]
        runs = dict(con.execute("SELECT round, CASE WHEN status = 'ok' THEN 'ok' ELSE status || ': ' || error END "
                                "FROM eval_runs").fetchall())
        evals = con.execute("SELECT round, benchmark, value FROM eval_scores WHERE key = 'score'").fetchall()
        blocked = [r[0] for r in con.execute("SELECT reason FROM blocked_publications ORDER BY id")]
        events = con.execute("SELECT round, attempt, event, site, detail FROM round_events ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # schema not created yet
        return [], {}, Releases([], [])
    finally:
        con.close()
    shared: dict[int, dict[str, float]] = {}
    for r, b, v in evals:
        shared.setdefault(r, {})[b] = v
    m: dict[tuple[int, str, str], dict[str, float]] = {}
    for r, s, phase, k, v in mets:
        m.setdefault((r, s, phase), {})[k] = v

    def heldout(r: int) -> dict[str, tuple[float, float]]:
        return {s: (v["loss"], v.get("tokens", 1.0)) for (rr, s, ph), v in m.items()
                if rr == r and ph == "eval_global" and "loss" in v}

    views = []
    for r, state, info in rounds:
        uploaded = {s: m.get((r, s, "train"), {}).get("loss", float("nan")) for rr, s in ups if rr == r}
        error = json.loads(info).get("aggregation_error", {}).get("mean", float("nan")) if info else float("nan")
        views.append(RoundView(r, state, uploaded, heldout(r + 1), error,  # round r+1's input = round r's output
                               shared.get(r, {}), runs.get(r, ""),
                               tuple(decision_line(*e[1:4], json.loads(e[4])) for e in events if e[0] == r)))
    return views, heldout(1), Releases(pubs, blocked)


def decision_line(attempt: int, event: str, site: str, detail: dict) -> str:
    """One round decision in words, e.g. ``deadline passed (attempt 1): closed with site-a, site-b; missing site-c``."""
    words = event.replace("_", " ") + (f" (attempt {attempt})" if attempt else "")
    if event in ("quorum_reached", "deadline_passed", "all_remaining_answered", "round_abandoned"):
        words += f": {detail.get('updates', 0)} of k={detail.get('k', '?')} update(s)"
        if detail.get("missing"):
            words += f"; missing {', '.join(detail['missing'])}"
    elif event == "site_dropped":
        words += f": {site} silent for {detail.get('silent_s', '?')}s"
    elif event == "late_update_carried":
        words += (f": {site}'s update from round {detail.get('trained_round')} (staleness {detail.get('staleness')}, "
                  f"weight {detail.get('weight', 0):.3f})")
    elif event == "late_update_dropped":
        words += f": {site}'s update for round {detail.get('trained_round')}"
    return words


def federated_steps(db: Path) -> dict[str, int]:
    """Optimizer steps each site's trainer reported over all rounds (its ``train`` metric ``steps``)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT site, SUM(value) FROM metrics WHERE phase = 'train' AND key = 'steps' "
                           "GROUP BY site").fetchall()
    finally:
        con.close()
    return {s: int(v) for s, v in rows}


def comparison(views: list[RoundView], initial: dict[str, tuple[float, float]], steps: dict[str, int],
               local: dict[str, dict]) -> list[dict]:
    """The final table's rows: the initial adapter, the federated model, and each site's local-only model.

    Each row holds ``model``, ``trained_on``, ``steps`` (site -> optimizer steps its trainer reported),
    ``heldout`` (site -> [loss, tokens] on that site's held-out task) and ``union_heldout_loss``.
    """
    final = views[-1].heldout if views else {}
    rows = [{"model": "initial adapter", "trained_on": "", "steps": {}, "heldout": {s: list(v) for s, v in initial.items()},
             "union_heldout_loss": union_loss(initial)},
            {"model": "federated", "trained_on": "all sites", "steps": dict(steps),
             "heldout": {s: list(v) for s, v in final.items()}, "union_heldout_loss": union_loss(final)}]
    for site, r in local.items():
        heldout = {s: (float(v[0]), float(v[1])) for s, v in r["heldout"].items()}
        rows.append({"model": f"local-only {site}", "trained_on": site, "steps": {site: int(r["steps"])},
                     "heldout": {s: list(v) for s, v in heldout.items()}, "union_heldout_loss": union_loss(heldout)})
    return rows


def constant_zero_columns(views: list[RoundView]) -> list[str]:
    """Shared-benchmark columns that read 0 in every evaluated round (a format no site trains, or a broken eval)."""
    benches = sorted({b for v in views for b in v.shared})
    return [b for b in benches if all(v.shared.get(b, 0.0) == 0.0 for v in views if b in v.shared)]


def comparison_table(rows: list[dict], sites: list[str]) -> Table:
    t = Table(title="what federation buys: held-out loss on each site's task and on their union (lower is better; "
                    "optimizer steps as each trainer reported them)",
              title_justify="left")
    t.add_column("model")
    t.add_column("optimizer steps", justify="right")
    for s in sites:
        t.add_column(s, justify="right")
    t.add_column("union", justify="right")
    best = min(r["union_heldout_loss"] for r in rows[1:])
    for r in rows:
        counts = sorted(set(r["steps"].values()))
        steps = (f"{counts[0]} per site" if len(r["steps"]) > 1 else str(counts[0])) if len(counts) == 1 else \
            ", ".join(f"{s} {n}" for s, n in sorted(r["steps"].items())) or "0"
        union = f"{r['union_heldout_loss']:.4f}"
        t.add_row(r["model"], steps, *[f"{r['heldout'][s][0]:.4f}" if s in r["heldout"] else "" for s in sites],
                  f"[bold]{union}[/]" if r["union_heldout_loss"] == best else union)
    return t


def union_loss(heldout: dict[str, tuple[float, float]]) -> float:
    tokens = sum(t for _, t in heldout.values())
    return sum(loss * t for loss, t in heldout.values()) / tokens if tokens else float("nan")


def shared_line(view: RoundView) -> str:
    """The round's shared-benchmark scores, in words."""
    if view.eval_status.startswith("failed"):
        return f"\nshared benchmark (EvalScope): [red]{view.eval_status}[/]"
    if not view.shared:
        return ""
    scores = " · ".join(f"{b} {v:.3f}" for b, v in sorted(view.shared.items()))
    return f"\nshared benchmark (EvalScope, merged model): {scores}"


def round_table(view: RoundView, before: dict[str, tuple[float, float]], sites: list[str]) -> Table:
    t = Table(title=f"round {view.round}", title_justify="left",
              caption=f"aggregation error of the published adapter vs mean(B_i A_i): {view.aggregation_error:.4f}"
                      + shared_line(view) + "".join(f"\n{d}" for d in view.decisions),
              caption_justify="left")
    t.add_column("site")
    t.add_column("train loss", justify="right")
    t.add_column("held-out loss (global in)", justify="right")
    t.add_column("held-out loss (global out)", justify="right")
    for s in sites:
        t.add_row(s, f"{view.uploaded.get(s, float('nan')):.4f}", f"{before.get(s, (float('nan'), 0))[0]:.4f}",
                  f"{view.heldout.get(s, (float('nan'), 0))[0]:.4f}")
    t.add_row("[bold]union[/]", "", f"{union_loss(before):.4f}", f"[bold]{union_loss(view.heldout):.4f}[/]")
    return t


def run_demo(cfg: DemoConfig, console: Console | None = None) -> Path:
    """Run the demo end to end; returns the published model directory."""
    console = console or Console()
    start = time.monotonic()
    workdir = Path(cfg.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"[bold]fedbridge demo[/]: {cfg.sites} sites, {cfg.rounds} rounds, {cfg.steps} local steps/round")
    if cfg.base_model is not None:
        base = Path(cfg.base_model).resolve()
    else:
        with console.status("building the tiny base model (cached after the first run)"):
            base = build_tiny_model()
    evaluate = cfg.eval_every > 0
    fed = localfed.prepare(workdir, base, n_sites=cfg.sites, rounds=cfg.rounds,
                           chat_template=Path(cfg.chat_template).resolve() if cfg.chat_template else None,
                           base_model_ref=base.name if cfg.base_model is not None else "fedbridge/tiny-llama",
                           training={"max_steps": cfg.steps, "learning_rate": cfg.learning_rate, "batch_size": 8},
                           lora={"rank": cfg.rank, "alpha": 2.0 * cfg.rank, "target_modules": ["all-linear"]},
                           shared_eval={"every_k_rounds": cfg.eval_every, "max_new_tokens": 8} if evaluate else None,
                           gate={"thresholds": {"general_qa": cfg.gate_qa}, "max_regression": 0.05} if evaluate else None,
                           publish={"license": "apache-2.0"})
    names = [s.name for s in fed.sites]
    local_out = {n: workdir / "local-only" / f"{n}.json" for n in names} if cfg.baseline else {}
    for s in fed.sites:
        console.print(f"  {s.name}: {s.skill}  (private data: {s.train_path.relative_to(workdir)})")
    db = fed.state_dir / "coordinator.db"
    with fed:
        port = fed.start_coordinator()
        console.print(f"coordinator on 127.0.0.1:{port} (mutual TLS, dev CA at {fed.root / 'pki' / 'ca.pem'})")
        from coordinator.trust.pki import DEV_PKI_WARNING

        console.print(f"[bold yellow]WARNING[/]: {DEV_PKI_WARNING}")
        dash = fed.state_dir / "dashboard.port"
        for _ in range(50):  # the dashboard comes up right after the gRPC port
            if dash.exists():
                console.print(f"dashboard: http://127.0.0.1:{int(dash.read_text())}/  (live rounds, loss curves, "
                              "/metrics)")
                break
            time.sleep(0.1)
        for s in fed.sites:
            fed.start_site(s, threads=1)
        # The baselines train beside the federation, each in its own process, on 1 thread.
        for s in fed.sites if cfg.baseline else []:
            fed.procs[f"local-only-{s.name}"] = localfed._spawn(
                [localfed.PY, "-m", "sandbox.local_only", "--federation", str(fed.federation_toml),
                 "--base-model", str(fed.base_model), "--train", str(s.train_path),
                 *[a for o in fed.sites for a in ("--heldout", f"{o.name}={o.heldout_path}")],
                 "--work-dir", str(workdir / "local-only" / s.name), "--out", str(local_out[s.name])],
                fed.log_path(f"local-only-{s.name}"))
        shown = 0
        releases = Releases([], [])
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bars:
            overall = bars.add_task("rounds aggregated", total=cfg.rounds)
            per_site = {n: bars.add_task(f"  {n} updates sent", total=cfg.rounds) for n in names}
            baselines = bars.add_task("local-only baselines done", total=len(local_out), visible=cfg.baseline)
            while True:
                bars.update(baselines, completed=sum(1 for p in local_out.values() if p.exists()))
                views, initial, releases = read_store(db, cfg.rounds)
                for n in names:
                    bars.update(per_site[n], completed=sum(1 for v in views if n in v.uploaded))
                bars.update(overall, completed=sum(1 for v in views if v.state == "closed"))
                while (shown < len(views) and len(views[shown].heldout) == len(names) and views[shown].state == "closed"
                       and (not evaluate or views[shown].eval_status
                            or not is_due(views[shown].round, cfg.rounds, cfg.eval_every))):
                    before = initial if shown == 0 else views[shown - 1].heldout
                    bars.console.print(round_table(views[shown], before, names))
                    shown += 1
                if (releases.published or releases.blocked) and shown == cfg.rounds:
                    break
                failed = {n: p.returncode for n, p in fed.procs.items() if p.poll() not in (None, 0)}
                if failed:
                    raise RuntimeError(f"process(es) failed: {failed}; logs in {fed.root / 'logs'}")
                if time.monotonic() - start > cfg.timeout_s:
                    raise TimeoutError(f"demo did not finish within {cfg.timeout_s}s; logs in {fed.root / 'logs'}")
                time.sleep(0.3)
        fed.wait(names + ["coordinator"], timeout=120)
        left = max(30.0, cfg.timeout_s - (time.monotonic() - start))
        with console.status("waiting for the local-only baselines"):
            codes = fed.wait([f"local-only-{n}" for n in local_out], timeout=left)
        if any(codes.values()):
            raise RuntimeError(f"local-only baseline(s) failed: {codes}; logs in {fed.root / 'logs'}")
    views, initial, releases = read_store(db, cfg.rounds)
    benches = sorted({b for v in views for b in v.shared})
    summary = Table(title="the union of the sites' tasks, global model after each round: held-out loss (sites) and "
                          "shared benchmark (coordinator, EvalScope)", title_justify="left")
    summary.add_column("round")
    summary.add_column("union held-out loss", justify="right")
    for b in benches:
        summary.add_column(b, justify="right")
    summary.add_row("0 (initial)", f"{union_loss(initial):.4f}", *["" for _ in benches])
    for v in views:
        summary.add_row(str(v.round), f"{union_loss(v.heldout):.4f}",
                        *[f"{v.shared[b]:.3f}" if b in v.shared else "" for b in benches])
    console.print(summary)
    rows = comparison(views, initial, federated_steps(db),
                      {n: json.loads(p.read_text()) for n, p in local_out.items()})
    console.print(comparison_table(rows, names))
    if local_out:
        fed_union, best_local = rows[1]["union_heldout_loss"], min(r["union_heldout_loss"] for r in rows[2:])
        console.print(f"federated vs the best site alone on the union of the tasks: {fed_union:.4f} vs "
                      f"{best_local:.4f}" + (" [bold green](federation wins)[/]" if fed_union < best_local
                                             else " [bold red](federation does not win here)[/]"))
    results = workdir / "results.json"
    write_durable(results, json.dumps({
        "config": {"sites": cfg.sites, "rounds": cfg.rounds, "steps": cfg.steps, "learning_rate": cfg.learning_rate,
                   "rank": cfg.rank, "eval_every": cfg.eval_every, "baseline": cfg.baseline},
        "rounds": [{"round": 0, "union_heldout_loss": union_loss(initial), "shared": {}}]
        + [{"round": v.round, "union_heldout_loss": union_loss(v.heldout), "shared": v.shared} for v in views],
        "comparison": rows, "constant_zero_columns": constant_zero_columns(views),
        "seconds": time.monotonic() - start}, indent=2).encode())
    console.print(f"results: {results}")
    if not releases.published:
        for reason in releases.blocked:
            console.print(f"[bold red]publication blocked by the release gate[/]: {reason}")
        raise RuntimeError(f"nothing was published; see {fed.root / 'logs' / 'coordinator.log'}")
    path = Path(releases.published[-1])
    console.print(f"[bold green]published[/]: {path}  ({time.monotonic() - start:.0f}s)")
    console.print(f"  model card: {path / 'README.md'}")
    console.print(f"  load with: PeftModel.from_pretrained(base, '{path / 'adapter'}') "
                  f"or AutoModelForCausalLM.from_pretrained('{path / 'merged'}')")
    return path
