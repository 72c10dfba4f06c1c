"""Quality of LoRA aggregation: naive FedAvg, FFA-LoRA and FedEx-LoRA against centralized pooled LoRA training.

An in-process simulation (no gRPC: this measures aggregation, not transport). Every method starts from the same
initial adapter (A drawn from one seed, B = 0) and the same tiny base model, on the demo's non-IID synthetic tasks
(site i learns fact family i). Each site trains with the real site trainer (:class:`site_agent.training.trainer.SftSiteTrainer`,
TRL/PEFT) and the same ``(seed + round)`` per site and round under every method, and the coordinator's strategies
aggregate (:func:`strategies.registry.build_strategy`):

* ``fedavg``: A and B averaged separately; publishes mean(B)·mean(A) (inexact).
* ``ffa_lora`` (Sun et al., ICLR 2024): the task's hint freezes A at the shared seed; only B trains and is averaged.
* ``fedex_lora`` (Singhal et al., ACL 2025): A and B averaged, and the residual mean(B·A) − mean(B)·mean(A) folded
  into the frozen base weights (``W += alpha/r · residual``) of EVERY site's model and of the evaluation model, so
  each site trains the next round on base + residual, as the published model carries it.
* ``centralized``: one trainer on the union of the sites' train rows, in one continuous run with each site's number
  of steps (rounds × steps) and the sites' batches pooled into one (batch × sites): the same seeds, steps and
  examples as each federated run. This is the goal's reference.
* ``centralized_seq`` (informational): the same examples in sites × as many steps of one site's batch size.

Learning rates are each method's best on a sweep over a data seed the table does not use (``--sweep``); the table
reports means over two other data seeds (``--seeds``).

It reports the final held-out loss on the union of the sites' held-out splits (token-weighted), and for each
federated method the aggregation-error meter (:mod:`strategies.error_meter`), mean over LoRA modules, for the last
round and averaged over rounds. Methods run in parallel worker processes with one torch thread each.

    .venv/bin/python -m bench.quality            # 3 sites, 12 rounds x 10 steps, seeds 0 and 2 (~5 min, 2 cores)
    .venv/bin/python -m bench.quality --sites 5  # up to 5 sites
    .venv/bin/python -m bench.quality --sweep 0.001,0.002,0.005,0.01 --seed 1   # the learning-rate sweep
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.report import Row, write_results
from sandbox.synthetic import SiteData

FEDERATED = ("fedavg", "ffa_lora", "fedex_lora")
CENTRALIZED = "centralized"  # pooled data, each site's number of steps, the sites' batches pooled into one
CENTRALIZED_SEQ = "centralized_seq"  # pooled data, the same examples in sites x more steps of one site's batch
CENTRAL = (CENTRALIZED, CENTRALIZED_SEQ)
ALL_METHODS = (*FEDERATED, *CENTRAL)
LOSS_GOAL = 1.02  # FedEx/FFA within 2% of centralized
EXACT_GOAL = 1e-5  # the LoRA-exact rules' meter, as in the property tests


@dataclass(frozen=True)
class QualityConfig:
    """One comparison's settings (the defaults are the demo's learning settings).

    Attributes:
        sites: Non-IID sites, 1 to 5 (site i holds the i-th fact family of :mod:`sandbox.synthetic`).
        rounds: Federated rounds.
        steps: Local optimizer steps per site and round (the same for every method).
        batch_size: Per-device batch size.
        learning_rate: Constant local learning rate.
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r, also the scale of FedEx-LoRA's folded residual).
        max_length: Token limit per example.
        n_train: Train rows per site.
        n_heldout: Held-out rows per site (same facts, unseen phrasings).
        seed: Data seed, adapter seed and training seed (each round trains with ``seed + round``).
        workers: Worker processes (one method each at a time, one torch thread each); 1 runs in this process.
    """

    sites: int = 3
    rounds: int = 12
    steps: int = 10
    batch_size: int = 8
    learning_rate: float = 2e-3
    rank: int = 16
    alpha: float = 32.0
    max_length: int = 128
    n_train: int = 64
    n_heldout: int = 32
    seed: int = 0
    workers: int = 2
    # Chosen with ``--sweep 0.001,0.002,0.005,0.01 --seed 1`` (a data seed the comparison does not report on): every
    # method is best at 0.002 except FFA-LoRA, which trains only B against a frozen random A and is best at 0.01.
    method_lr: tuple[tuple[str, float], ...] = (("ffa_lora", 0.01),)
    methods: tuple[str, ...] = ALL_METHODS

    def lr(self, method: str) -> float:
        """The local learning rate of ``method`` (``method_lr`` overrides ``learning_rate``)."""
        return dict(self.method_lr).get(method, self.learning_rate)

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= 5:
            raise ValueError(f"sites must be 1..5, got {self.sites}")
        for name in ("rounds", "steps", "batch_size", "rank", "max_length", "n_train", "n_heldout", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 < self.learning_rate < 1 and self.alpha > 0):
            raise ValueError("learning_rate must be in (0, 1) and alpha > 0")
        for method, lr in self.method_lr:
            if method not in ALL_METHODS or not 0 < lr < 1:
                raise ValueError(f"method_lr: {method}={lr} (methods: {ALL_METHODS}, lr in (0, 1))")
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {sorted(unknown)} (choose from {ALL_METHODS})")


@dataclass(frozen=True)
class MethodResult:
    """What one method produced.

    Attributes:
        method: ``fedavg``, ``ffa_lora``, ``fedex_lora`` or ``centralized``.
        curve: Union held-out loss before training, then after each round (centralized: before and after).
        per_site: Final held-out loss of each site's own split.
        errors: Aggregation error per round, mean over LoRA modules (empty for centralized).
        modules: LoRA modules the meter covers.
        examples: Training examples seen in total.
        seconds: Wall time of the method.
    """

    method: str
    curve: tuple[float, ...]
    per_site: dict[str, float]
    errors: tuple[float, ...] = ()
    modules: int = 0
    examples: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.curve[-1]


def quiet() -> None:
    """Silence dataset-map and weight-loading bars and library warnings, so the output is the table and progress.

    Process-wide: only the bench's own processes call it (``main`` and the workers), never :func:`measure`.
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _task(cfg: QualityConfig, spec: Any, round_: int, steps: int, hints: Any, lr: float) -> Any:
    from protos.fedbridge.v1 import federation_service_pb2 as pb

    return pb.Task(federation_id="bench-quality", round=round_, total_rounds=cfg.rounds,
                   training=pb.TrainingConfig(mode="sft", max_steps=steps, learning_rate=lr,
                                              per_device_batch_size=cfg.batch_size, max_length=cfg.max_length,
                                              seed=cfg.seed, lr_scheduler_type="constant"),
                   adapter_spec=spec, hints=hints)


def fold_residual(model: Any, residual: dict[str, Any], scale: float) -> None:
    """Fold FedEx-LoRA's residual into a model's frozen base weights: ``W += scale · residual``.

    Args:
        model: The PEFT model (its base model's modules are looked up by the residual's base weight names, for
            example ``model.layers.0.self_attn.q_proj.weight``; a LoRA layer's ``base_layer`` holds the weight).
        residual: Unscaled dense residuals keyed by base weight name (``AggregationResult.base_residual``).
        scale: ``lora_alpha / r``.
    """
    import torch

    base = model.get_base_model()
    with torch.no_grad():
        for name, r in residual.items():
            module = base.get_submodule(name.removesuffix(".weight"))
            weight = getattr(module, "base_layer", module).weight
            if weight.shape != r.shape:
                raise ValueError(f"residual {name!r} has shape {tuple(r.shape)}, base weight {tuple(weight.shape)}")
            weight.add_(r.to(weight.dtype), alpha=scale)


def _evaluate(trainer: Any, spec: Any, state: dict[str, Any], rows: list[dict[str, Any]], max_length: int) -> float:
    loss, _ = trainer.evaluate(spec, state, rows, max_length=max_length)
    return loss


def run_method(method: str, cfg: QualityConfig, base_dir: Path, sites: list[SiteData], work_dir: Path) -> MethodResult:
    """Run one method end to end and measure it (one process, one torch thread).

    Args:
        method: One of :data:`FEDERATED` or :data:`CENTRALIZED`.
        cfg: The comparison's settings.
        base_dir: The tiny base model's directory.
        sites: The sites' data, as :func:`sandbox.synthetic.make_site_datasets` wrote it (read only here).
        work_dir: Scratch folder for this method.

    Returns:
        The method's held-out losses and, for federated methods, the error meter per round.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per trainer: the workers share the machine's cores
    try:
        return _run_method(method, cfg, base_dir, sites, work_dir)
    finally:
        torch.set_num_threads(threads)


def _run_method(method: str, cfg: QualityConfig, base_dir: Path, sites: list[SiteData], work_dir: Path
                ) -> MethodResult:
    from coordinator.config import LoraSpec
    from coordinator.rounds.adapter import init_adapter
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.training.data import load_sft
    from site_agent.training.trainer import SftSiteTrainer
    from strategies.error_meter import aggregation_error_from_updates
    from strategies.registry import build_strategy
    from strategies.types import ClientUpdate

    start = time.perf_counter()
    heldout = {s.name: load_sft(s.heldout_path) for s in sites}
    union = [row for rows in heldout.values() for row in rows]  # one list: evaluate() weights by tokens
    init = init_adapter(base_dir, LoraSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=("all-linear",),
                                           seed=cfg.seed))
    spec, scale = init.spec, cfg.alpha / cfg.rank

    if method in CENTRAL:
        pooled = [row for s in sites for row in load_sft(s.train_path)]
        trainer = SftSiteTrainer(base_dir, pooled, work_dir / "central")
        before = _evaluate(trainer, spec, init.state, union, cfg.max_length)
        if method == CENTRALIZED:  # each site's steps, with the sites' batches pooled into one
            steps, batch = cfg.rounds * cfg.steps, cfg.batch_size * cfg.sites
        else:  # the same examples in sites x as many steps of one site's batch size
            steps, batch = cfg.rounds * cfg.sites * cfg.steps, cfg.batch_size
        task = _task(cfg, spec, 1, steps, pb.SiteHints(), cfg.lr(method))
        task.training.per_device_batch_size = batch
        res = trainer.train_round(task, init.state)
        state = {k: init.state[k] + res.delta[k] for k in init.state}
        per_site = {n: _evaluate(trainer, spec, state, rows, cfg.max_length) for n, rows in heldout.items()}
        after = _evaluate(trainer, spec, state, union, cfg.max_length)
        print(f"[quality] {method}: {steps} steps, held-out {before:.3f} -> {after:.3f}", file=sys.stderr, flush=True)
        return MethodResult(method, (before, after), per_site, examples=steps * batch,
                            seconds=time.perf_counter() - start)

    strategy = build_strategy(method)
    hints = pb.SiteHints(freeze_lora_a=bool(strategy.site_params.get("freeze_lora_A", False)),
                         proximal_mu=float(strategy.site_params.get("proximal_mu", 0.0)))
    trainers = [SftSiteTrainer(base_dir, load_sft(s.train_path), work_dir / s.name) for s in sites]
    evaluator = SftSiteTrainer(base_dir, [], work_dir / "eval")
    state = init.state
    curve = [_evaluate(evaluator, spec, state, union, cfg.max_length)]
    errors: list[float] = []
    modules = examples = 0
    for round_ in range(1, cfg.rounds + 1):
        task = _task(cfg, spec, round_, cfg.steps, hints, cfg.lr(method))
        updates = []
        for site, trainer in zip(sites, trainers, strict=True):
            res = trainer.train_round(task, state)
            # The FedAvg weight is what the site holds (num_examples); the examples it saw are its steps x batch.
            updates.append(ClientUpdate(site.name, res.delta, res.num_examples))
            examples += cfg.steps * cfg.batch_size
        result = strategy.aggregate(state, updates)
        meter = aggregation_error_from_updates(state, updates, result.state, result.base_residual)
        modules = len(meter)
        errors.append(statistics.fmean(meter.values()))
        if result.base_residual:  # FedEx-LoRA: every site and the evaluation model train/score on base + residual
            for t in [*trainers, evaluator]:
                fold_residual(t.model, result.base_residual, scale)
        state = result.state
        curve.append(_evaluate(evaluator, spec, state, union, cfg.max_length))
        print(f"[quality] {method}: round {round_}/{cfg.rounds} held-out {curve[-1]:.3f} error {errors[-1]:.3g}",
              file=sys.stderr, flush=True)
    per_site = {n: _evaluate(evaluator, spec, state, rows, cfg.max_length) for n, rows in heldout.items()}
    return MethodResult(method, tuple(curve), per_site, tuple(errors), modules, examples, time.perf_counter() - start)


def measure(cfg: QualityConfig, work: Path, base_model: Path | None = None) -> dict[str, MethodResult]:
    """Run every method (in ``cfg.workers`` processes) and return their results by method name.

    Args:
        cfg: The comparison's settings.
        work: Scratch folder (data and trainer outputs).
        base_model: The base model directory; defaults to the cached tiny model (built on a miss).
    """
    from sandbox.synthetic import make_site_datasets
    from sandbox.tiny_model import build_tiny_model

    base = base_model or build_tiny_model()  # resolved once here, so workers never race to build it
    sites = make_site_datasets(work / "data", n_sites=cfg.sites, seed=cfg.seed, n_train=cfg.n_train,
                               n_heldout=cfg.n_heldout)
    methods = [m for m in (*CENTRAL, *FEDERATED) if m in cfg.methods]
    if cfg.workers == 1:
        return {m: run_method(m, cfg, base, sites, work / m) for m in methods}
    # spawn, not fork: forking a process whose torch/OpenMP pools are already started can hang.
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"), initializer=quiet) as pool:
        futures = {m: pool.submit(run_method, m, cfg, base, sites, work / m) for m in methods}
        return {m: f.result() for m, f in futures.items()}


def sweep(cfg: QualityConfig, lrs: tuple[float, ...], work: Path) -> dict[str, dict[float, float]]:
    """Final union held-out loss of every method at every learning rate in ``lrs``, on ``cfg``'s data seed.

    Used to choose each method's learning rate on a problem instance (data seed) other than the one the bench
    reports on, so the reported comparison is not tuned on its own held-out split.
    """
    from sandbox.synthetic import make_site_datasets
    from sandbox.tiny_model import build_tiny_model

    base = build_tiny_model()
    sites = make_site_datasets(work / "data", n_sites=cfg.sites, seed=cfg.seed, n_train=cfg.n_train,
                               n_heldout=cfg.n_heldout)
    jobs = [(m, lr) for m in (*CENTRAL, *FEDERATED) if m in cfg.methods for lr in lrs]
    out: dict[str, dict[float, float]] = {}
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"), initializer=quiet) as pool:
        futures = {(m, lr): pool.submit(run_method, m, replace(cfg, method_lr=((m, lr),)), base, sites,
                                        work / f"{m}-{lr:g}") for m, lr in jobs}
        for (m, lr), f in futures.items():
            out.setdefault(m, {})[lr] = f.result().final
            print(f"[quality] sweep {m} lr={lr:g}: {out[m][lr]:.4f}", file=sys.stderr, flush=True)
    return out


def combine(by_seed: dict[int, dict[str, MethodResult]]) -> dict[str, MethodResult]:
    """Each method's curve, per-site losses and error meter averaged over seeds (element-wise)."""
    out = {}
    for m in next(iter(by_seed.values())):
        rs = [res[m] for res in by_seed.values()]
        out[m] = MethodResult(
            m, tuple(statistics.fmean(x) for x in zip(*(r.curve for r in rs), strict=True)),
            {s: statistics.fmean(r.per_site[s] for r in rs) for s in rs[0].per_site},
            tuple(statistics.fmean(x) for x in zip(*(r.errors for r in rs), strict=True)), rs[0].modules,
            rs[0].examples, sum(r.seconds for r in rs))
    return out


def build_rows(results: dict[str, MethodResult], cfg: QualityConfig) -> list[Row]:
    """The bench table: held-out loss ratios against centralized and against naive FedAvg, and the error meter."""
    central, naive = results[CENTRALIZED], results["fedavg"]
    union = f"union of {cfg.sites} sites"
    rows = []
    for m in ("fedex_lora", "ffa_lora", "fedavg"):
        r = results[m].final / central.final
        goal = f"ratio <= {LOSS_GOAL}" if m != "fedavg" else "informational (naive)"
        rows.append(Row(f"{m} vs centralized: final held-out loss ({union})", results[m].final, central.final, r,
                        "nats/token", goal, r <= LOSS_GOAL if m != "fedavg" else None))
    seq = results[CENTRALIZED_SEQ]
    for m in ("fedex_lora", "ffa_lora"):
        r = results[m].final / seq.final
        rows.append(Row(f"{m} vs centralized with the same examples in {cfg.sites}x the steps: final held-out loss "
                        f"({union})", results[m].final, seq.final, r, "nats/token", "informational", None))
    for m in ("fedex_lora", "ffa_lora"):
        r = results[m].final / naive.final
        rows.append(Row(f"{m} vs naive fedavg: final held-out loss ({union})", results[m].final, naive.final, r,
                        "nats/token", "ratio <= 1 (never worse than naive)", r <= 1.0))
    for which, pick in (("last round", lambda e: e[-1]), (f"mean over {cfg.rounds} rounds", statistics.fmean)):
        ref = pick(naive.errors)
        for m in FEDERATED:
            ours = pick(results[m].errors)
            ratio = ours / ref if ref > 0 else math.nan
            exact = m != "fedavg"
            rows.append(Row(f"{m}: aggregation error, {which} (mean over {results[m].modules} modules; "
                            f"reference: naive fedavg)", ours, ref, ratio, "rel. Frobenius",
                            f"ours <= {EXACT_GOAL:g} (exact)" if exact else "informational (naive)",
                            ours <= EXACT_GOAL if exact else None))
    return rows


def build_notes(results: dict[str, MethodResult], cfg: QualityConfig, wall_s: float,
                by_seed: dict[int, dict[str, MethodResult]] | None = None) -> list[str]:
    """What the table does not say: settings, curves, per-site losses, and what makes the comparison imperfect."""
    seeds = sorted(by_seed) if by_seed else [cfg.seed]
    lrs = ", ".join(f"{m} {cfg.lr(m):g}" for m in ALL_METHODS)
    notes = [
        f"{cfg.sites} non-IID sites (sandbox.synthetic, {cfg.n_train} train / {cfg.n_heldout} held-out rows each), "
        f"tiny Llama base, LoRA r={cfg.rank} alpha={cfg.alpha:g} all-linear, constant lr ({lrs}), batch "
        f"{cfg.batch_size}, {cfg.rounds} rounds x {cfg.steps} local steps. centralized: the pooled train rows, "
        f"{cfg.rounds * cfg.steps} steps (each site's count) of batch {cfg.batch_size * cfg.sites} (the sites' "
        f"batches pooled): the same steps and examples as each federated run; centralized_seq: the same examples in "
        f"{cfg.rounds * cfg.steps * cfg.sites} steps of batch {cfg.batch_size}. Table values are means over data "
        f"seeds {seeds} (data, adapter and training seeds). Wall time {wall_s:.0f} s with {cfg.workers} worker "
        "process(es), 1 torch thread each.",
    ]
    if by_seed and len(by_seed) > 1:
        notes.append("Final union held-out loss per seed: " + "; ".join(
            f"seed {seed}: " + ", ".join(f"{m} {res[m].final:.3f}" for m in ALL_METHODS)
            for seed, res in sorted(by_seed.items())) + ".")
    notes += [
        "Held-out loss per round, mean over seeds (before training, then after each round): " + "; ".join(
            f"{m} " + " -> ".join(f"{x:.3f}" for x in results[m].curve) for m in ALL_METHODS) + ".",
        "Final held-out loss per site: " + "; ".join(
            f"{m} " + ", ".join(f"{s} {x:.3f}" for s, x in results[m].per_site.items())
            for m in ALL_METHODS) + ".",
        "Aggregation error per round (mean over modules): " + "; ".join(
            f"{m} " + ", ".join(f"{x:.3g}" for x in results[m].errors) for m in FEDERATED) + ".",
        "Imperfect comparison: few seeds (differences of a few percent are within seed noise); centralized trains "
        "in one continuous run with one AdamW state and mixed-skill batches, while each site restarts AdamW every "
        "round (as the site agent does) and sees one skill per batch; learning rates were chosen per method on "
        "data seed 1 (see QualityConfig.method_lr), which the table does not use.",
    ]
    return notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = QualityConfig()
    p.add_argument("--sites", type=int, default=d.sites, help="non-IID sites, 1..5")
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds")
    p.add_argument("--steps", type=int, default=d.steps, help="local steps per site and round")
    p.add_argument("--workers", type=int, default=min(d.workers, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                   help="a method's own learning rate (repeat), e.g. ffa_lora=0.01")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated subset of methods to run")
    p.add_argument("--sweep", default="", metavar="LR,LR,...",
                   help="instead of the comparison: each method's final loss at each learning rate, on --seed")
    p.add_argument("--seed", type=int, default=d.seed, help="data/adapter/training seed (for --sweep)")
    p.add_argument("--seeds", default="0,2", help="comma-separated seeds of the comparison (means are reported)")
    a = p.parse_args(argv)
    try:
        method_lr = tuple((m, float(v)) for m, v in (x.split("=", 1) for x in a.lr))
    except ValueError:
        p.error("--lr takes METHOD=LR, e.g. ffa_lora=0.01")
    cfg = QualityConfig(sites=a.sites, rounds=a.rounds, steps=a.steps, workers=a.workers, seed=a.seed,
                        method_lr=method_lr or d.method_lr, methods=tuple(a.methods.split(",")))
    quiet()
    if a.sweep:
        lrs = tuple(float(x) for x in a.sweep.split(","))
        with tempfile.TemporaryDirectory(prefix="fedbridge-quality-sweep-") as tmp:
            table = sweep(cfg, lrs, Path(tmp))
        print(f"| method | {' | '.join(f'lr {lr:g}' for lr in lrs)} | best |")
        print(f"|---|{'---|' * len(lrs)}---|")
        for m, by_lr in table.items():
            best = min(by_lr, key=by_lr.__getitem__)
            print(f"| {m} | {' | '.join(f'{by_lr[lr]:.4f}' for lr in lrs)} | {best:g} |")
        print(f"final union held-out loss, data seed {cfg.seed}, {cfg.sites} sites, {cfg.rounds} rounds x {cfg.steps} "
              "steps (centralized: the same examples in one run)")
        return
    start = time.perf_counter()
    by_seed = {}
    for seed in (int(x) for x in a.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="fedbridge-quality-") as tmp:
            by_seed[seed] = measure(replace(cfg, seed=seed), Path(tmp))
    wall = time.perf_counter() - start
    results = combine(by_seed)
    if set(results) != set(ALL_METHODS):  # a subset of methods: no comparison table
        for m, r in results.items():
            print(f"{m} lr={cfg.lr(m):g}: final union held-out loss {r.final:.4f} (curve "
                  + " -> ".join(f"{x:.3f}" for x in r.curve) + f"); {r.seconds:.0f} s")
        return
    write_results("quality", build_rows(results, cfg), build_notes(results, cfg, wall, by_seed))


if __name__ == "__main__":
    main()
