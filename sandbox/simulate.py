"""``fedbridge simulate``: N virtual sites on Flower's simulation engine (Ray), with the real trainer and strategies.

The data is the synthetic task pool split non-IID by :mod:`sandbox.partition` (Dirichlet α label skew over the fact
families). Each virtual site is a Flower SuperNode running fedbridge's ClientApp (:mod:`site_agent.flower.clientapp`:
the site trainer and egress filters on ``partition-dir/site-{partition-id}.jsonl``); the ServerApp side runs
fedbridge's Flower strategy wrapper (:mod:`coordinator.flower.strategy`) around a :mod:`strategies` rule, sampling
``fraction`` of the sites each round. After every round the driver scores the global adapter on the union held-out
set with the site trainer's own evaluation (:meth:`site_agent.training.trainer.SftSiteTrainer.evaluate`, as
:mod:`bench.quality` does), and records the round's wall time, the sites it sampled, and the peak memory of the
driver and its Ray processes.

``--ray-address`` joins an existing Ray cluster instead of starting a local one, so the same run goes past one
machine: nothing else changes (the virtual sites' data and the base model are then read from the paths in the run
config, so they must be on storage every Ray node sees).

Results (in ``--out``): ``results.json`` (settings, one row per round, totals), ``results.md`` and ``results.csv``
(the per-round table).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcommon.durable import write_durable

LOCAL_RAY_IP = "127.0.0.2"  # the local Ray's node address (loopback; see backend_config)
# CLI strategy name -> strategies.registry name, for the rules the results tables compare: fedavg averages A and B
# separately (naive LoRA aggregation); fedex-lora is exact (the residual mean(B·A) - mean(B)·mean(A) goes into the
# base weights). ``--strategy`` also takes any other registered rule (hyphens for underscores).
STRATEGIES = {"fedavg": "fedavg", "fedex-lora": "fedex_lora"}


def rule_name(strategy: str) -> str:
    """The registered rule ``--strategy`` names (hyphens or underscores)."""
    return STRATEGIES.get(strategy, strategy.replace("-", "_"))


def parse_client_resources(text: str) -> tuple[float, float]:
    """``CPUS[,GPUS]`` (``--client-resources``) as (cpus, gpus).

    Raises:
        ValueError: Not one or two numbers.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError
        cpus, gpus = float(parts[0]), float(parts[1]) if len(parts) == 2 else 0.0
    except ValueError:
        raise ValueError(f"--client-resources: expected CPUS or CPUS,GPUS (numbers, e.g. 1 or 0.5,0.25), got "
                         f"{text!r}") from None
    return cpus, gpus


def parse_lora_ranks(text: str) -> tuple[int, ...]:
    """``R[,R...]`` (``--lora-ranks``) as a tuple of ints; empty text: ().

    Raises:
        ValueError: An entry that is not an integer.
    """
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--lora-ranks: expected integers separated by commas (e.g. 8,4,2), got {text!r}") from None


@dataclass(frozen=True)
class SimulateConfig:
    """One simulation's settings.

    Attributes:
        sites: Virtual sites (Flower SuperNodes), >= 2.
        rounds: Federated rounds.
        alpha: Dirichlet concentration of the label-skew partition (small: skewed; large: about IID).
        fraction: Share of the sites sampled for training each round, in (0, 1] (at least one site).
        strategy: Any registered rule (``strategies.registry.list_strategies``): ``fedavg`` (naive LoRA averaging),
            ``fedex-lora`` (exact), ``hetlora`` / ``flexlora`` (mixed ranks), ``fedprox``, ``fedadam``...
            Its parameters are the rule's defaults.
        steps: Local optimizer steps per sampled site and round.
        batch_size: Per-site batch size.
        learning_rate: Constant local learning rate.
        rank: LoRA rank (alpha = 2 x rank, all-linear).
        lora_ranks: Each site's own rank (site ``i`` trains ``lora_ranks[i mod len]``; empty: every site ``rank``);
            ranks below ``rank`` need a mixed-rank rule.
        rows_per_site: Mean train rows per site (the pool holds ``rows_per_site x sites`` rows).
        heldout_per_class: Held-out rows per fact family in the union held-out set.
        seed: Partition, adapter and training seed.
        ray_address: Join this Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``); None: start a local Ray
            and shut it down at the end.
        num_cpus: CPUs of the local Ray (None: every core); not allowed with ``ray_address``.
        client_cpus: CPUs per virtual site (Ray actor): local Ray runs ``num_cpus / client_cpus`` sites at once.
        client_gpus: GPUs per virtual site (0: CPU only).
        out: Results folder (data, logs, tables; created if missing).
        base_model: Base model directory; None: the house tiny model (built on a miss).
    """

    sites: int = 10
    rounds: int = 3
    alpha: float = 1.0
    fraction: float = 1.0
    strategy: str = "fedavg"
    steps: int = 2
    batch_size: int = 4
    learning_rate: float = 5e-3
    rank: int = 8
    lora_ranks: tuple[int, ...] = ()
    rows_per_site: int = 8
    heldout_per_class: int = 16
    seed: int = 0
    ray_address: str | None = None
    num_cpus: int | None = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    out: Path = Path("simulate-run")
    base_model: Path | None = None

    def __post_init__(self) -> None:
        def bad(option: str, why: str) -> ValueError:
            return ValueError(f"--{option}: {why}")

        if self.sites < 2:
            raise bad("sites", f"a federation needs at least 2 sites, got {self.sites}")
        for name in ("rounds", "steps", "batch_size", "rank", "rows_per_site", "heldout_per_class"):
            if getattr(self, name) < 1:
                raise bad(name.replace("_", "-"), f"must be >= 1, got {getattr(self, name)}")
        if not (self.alpha > 0 and not math.isnan(self.alpha)):
            raise bad("alpha", f"the Dirichlet concentration must be > 0, got {self.alpha}")
        if not 0 < self.fraction <= 1:
            raise bad("fraction", f"the share of sites sampled per round must be in (0, 1], got {self.fraction}")
        for r in self.lora_ranks:
            if not 1 <= r <= self.rank:
                raise bad("lora-ranks", f"rank {r} is outside 1..{self.rank} (--rank)")
        if self.strategy not in STRATEGIES or self.lora_ranks:  # the registry imports torch: only when needed
            from strategies.registry import SITE_RANK_RULES, list_strategies

            if rule_name(self.strategy) not in list_strategies():
                raise bad("strategy", f"unknown {self.strategy!r}; choose from {', '.join(STRATEGIES)} or any of "
                          f"{', '.join(r for r in list_strategies() if r not in STRATEGIES.values())}")
            if any(r != self.rank for r in self.lora_ranks) and rule_name(self.strategy) not in SITE_RANK_RULES:
                raise bad("lora-ranks", f"sites below --rank {self.rank} need a mixed-rank strategy "
                          f"({', '.join(sorted(SITE_RANK_RULES))}), not {self.strategy!r}")
        if not 0 < self.learning_rate < 1:
            raise bad("learning-rate", f"must be in (0, 1), got {self.learning_rate}")
        if self.ray_address is not None and not self.ray_address.strip():
            raise bad("ray-address", "empty; leave it out to start a local Ray")
        if self.ray_address is not None and self.num_cpus is not None:
            raise bad("num-cpus", "sizes a local Ray; a cluster joined with --ray-address has its own CPUs")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise bad("num-cpus", f"must be >= 1, got {self.num_cpus}")
        if not self.client_cpus > 0 or self.client_gpus < 0:
            raise bad("client-resources", f"CPUs per site must be > 0 and GPUs >= 0, got {self.client_cpus} and "
                      f"{self.client_gpus}")
        if self.num_cpus is not None and self.client_cpus > self.num_cpus:
            raise bad("client-resources", f"{self.client_cpus} CPUs per site is more than the {self.num_cpus} of "
                      "the local Ray: no site could ever run")
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            raise bad("base-model", f"{self.base_model} is not a model directory (no config.json)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise bad("out", f"{self.out} exists and is not a folder")

    @property
    def sampled_per_round(self) -> int:
        """Sites sampled per round: ``fraction x sites``, at least one."""
        return max(1, int(self.fraction * self.sites))


@dataclass
class RoundRow:
    """One round of the results table."""

    round: int
    wall_s: float  # training round: from sending the tasks to the aggregated adapter (held-out scoring excluded)
    heldout_loss: float  # union held-out loss of the round's global adapter (token-weighted)
    sampled: int  # sites sent a task this round
    replied: int  # sites whose update was aggregated
    peak_rss_mib: float  # peak so far of the summed RSS of the driver and its Ray processes


@dataclass
class SimulationResult:
    """What one simulation measured."""

    config: dict[str, Any]
    initial_loss: float
    rounds: list[RoundRow] = field(default_factory=list)
    total_wall_s: float = 0.0
    startup_s: float = 0.0  # from the start to the first task sent (data, Ray, the evaluation model and round 0)
    peak_rss_mib: float = 0.0
    memory_scope: str = ""
    ray: dict[str, Any] = field(default_factory=dict)  # the Ray the sites ran on: GCS address, nodes, CPUs

    @property
    def final_loss(self) -> float:
        return self.rounds[-1].heldout_loss if self.rounds else self.initial_loss

    @property
    def mean_round_s(self) -> float:
        return sum(r.wall_s for r in self.rounds) / len(self.rounds) if self.rounds else math.nan


class MemorySampler:
    """Peak summed RSS of this process and its descendants (the local Ray's GCS, raylet and workers), sampled.

    RSS counts pages shared between processes (Ray's object store, shared libraries) once per process, so the sum
    is an upper bound of what the machine needed. With a joined cluster only this machine's descendants are seen.
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, name="fedbridge-simulate-rss", daemon=True)

    def sample(self) -> int:
        total = 0
        for p in [self._root, *self._root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue  # a worker that ended between the listing and the read
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class HeldoutScorer:
    """The union held-out loss of a global adapter, by the site trainer's own evaluation (one model, kept).

    Under FedEx-LoRA the caller first sets the cumulative residual (``trainer.set_base_residual``), so the adapter is
    scored on the base the sites trained on.
    """

    def __init__(self, base_model: Path, heldout_path: Path, spec: Any, work_dir: Path) -> None:
        from site_agent.training.data import load_sft
        from site_agent.training.trainer import SftSiteTrainer

        self.rows = load_sft(heldout_path)
        self.spec = spec
        self.trainer = SftSiteTrainer(base_model, [], work_dir)

    def loss(self, state: dict[str, Any]) -> float:
        loss, _ = self.trainer.evaluate(self.spec, state, self.rows, max_length=128)
        return loss


class SimulationError(RuntimeError):
    """The simulation could not start or did not finish (one line: what and where)."""


def _kill_ray_processes(temp_dir: str) -> None:
    """End what a failed local Ray start left behind: its GCS, and agents its crashed raylet orphaned.

    Only processes whose command line names this run's private Ray temp folder, or that hold a file open in it, are
    touched: Ray's agents retitle themselves (``ray::DashboardAgent``), but keep their logs there open.
    """
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []) or any(
                    f.path.startswith(temp_dir) for f in p.open_files()):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def start_ray(init_args: dict[str, Any], attempts: int = 5) -> None:
    """Start (or join) Ray before Flower does, so start-up is timed apart from round 1 and a slow start is retried.

    Ray gives a starting node a fixed 30 s to come up, and its raylet gives the metrics agent a fixed time to write
    its port file; on a heavily loaded machine either can run out (measured here at load average 16-19 on 2 cores:
    the raylet aborts with "Timed out waiting for file .../metrics_agent_port_..."). A failed local start's leftover
    processes are ended before the next try. Flower's Ray backend then finds Ray initialised and uses it. The
    workers get the driver's ``sys.path`` as Flower's own start-up would give them.

    Raises:
        SimulationError: Ray did not start in ``attempts`` tries (or the cluster could not be joined).
    """
    import sys

    import ray

    pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    last = ""
    for _ in range(attempts):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises plain Exception for a start-up timeout
            last = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            if ray.is_initialized():
                ray.shutdown()
            if init_args.get("_temp_dir"):
                _kill_ray_processes(str(init_args["_temp_dir"]))
            if "address" in init_args:
                break  # a cluster that cannot be joined will not become joinable by retrying at once
    where = init_args.get("address") or "a local Ray"
    raise SimulationError(f"could not start {where} ({attempts if 'address' not in init_args else 1} tries): {last}")


def ray_info() -> dict[str, Any]:
    """Where the simulation runs: the Ray cluster's GCS address, its live nodes and CPUs (recorded in the results)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"gcs_address": ray.get_runtime_context().gcs_address, "nodes": len(nodes),
            "cpus": float(ray.cluster_resources().get("CPU", 0.0))}


def backend_config(cfg: SimulateConfig, ray_temp: Path) -> dict[str, Any]:
    """Flower's Ray backend settings: the virtual sites' resources and how Ray starts (or which cluster it joins)."""
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if cfg.ray_address is not None:
        init["address"] = cfg.ray_address
    else:
        # A private local Ray: its own temp folder (sockets, logs), only loopback, sized to this run. Ray replaces
        # a node address of 127.0.0.1 with the host's interface address (so other hosts could reach it); another
        # loopback address it leaves alone, so every connection of the run stays on lo.
        init.update(num_cpus=cfg.num_cpus or os.cpu_count() or 1, _temp_dir=str(ray_temp),
                    _node_ip_address=LOCAL_RAY_IP)
        if cfg.client_gpus == 0:
            init["num_gpus"] = 0
    return {"init_args": init, "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}}


def results_table(res: SimulationResult) -> str:
    """The per-round markdown table."""
    lines = ["| round | wall (s) | held-out loss | sites sampled | updates aggregated | peak RSS (MiB) |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| 0 | | {res.initial_loss:.4f} | | | |"]
    lines += [f"| {r.round} | {r.wall_s:.2f} | {r.heldout_loss:.4f} | {r.sampled} | {r.replied} | "
              f"{r.peak_rss_mib:.0f} |" for r in res.rounds]
    return "\n".join(lines)


def write_results(res: SimulationResult, out: Path) -> None:
    """``results.json``, ``results.md`` and ``results.csv`` in ``out`` (each written atomically)."""
    doc = {"config": res.config, "initial_loss": res.initial_loss, "final_loss": res.final_loss,
           "total_wall_s": res.total_wall_s, "startup_s": res.startup_s, "mean_round_s": res.mean_round_s,
           "peak_rss_mib": res.peak_rss_mib, "memory_scope": res.memory_scope, "ray": res.ray,
           "rounds": [asdict(r) for r in res.rounds]}
    write_durable(out / "results.json", (json.dumps(doc, indent=1) + "\n").encode())
    c = res.config
    md = (f"# fedbridge simulate: {c['sites']} sites, {c['rounds']} rounds, alpha {c['alpha']}, fraction "
          f"{c['fraction']}, {c['strategy']}\n\n{results_table(res)}\n\n"
          f"Total {res.total_wall_s:.1f} s (start-up {res.startup_s:.1f} s: data, Ray, the evaluation model; round 1 "
          f"also starts the Ray workers and loads each site's model); mean round "
          f"{res.mean_round_s:.2f} s; peak RSS {res.peak_rss_mib:.0f} MiB ({res.memory_scope}).\n")
    write_durable(out / "results.md", md.encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["round", "wall_s", "heldout_loss", "sampled", "replied", "peak_rss_mib"])
    w.writerow([0, "", f"{res.initial_loss:.6f}", "", "", ""])
    for r in res.rounds:
        w.writerow([r.round, f"{r.wall_s:.3f}", f"{r.heldout_loss:.6f}", r.sampled, r.replied, f"{r.peak_rss_mib:.1f}"])
    write_durable(out / "results.csv", buf.getvalue().encode())


def federation_toml(cfg: SimulateConfig, base: Path, out: Path) -> Path:
    """The ``federation.toml`` the Flower ServerApp builds the adapter and tasks from (written in ``out``).

    Only what the Flower ServerApp reads matters (base, rounds, rule, LoRA, training); the listener, TLS, state and
    registry fields are required by the config's schema but unused over Flower's transport.
    """
    from fedcommon.tomlconfig import dumps

    doc = {
        "federation_id": "simulate", "base_model": str(base), "rounds": cfg.rounds,
        # Flower samples max(fraction x sites, min_sites): min_sites is the round's sample, so --fraction decides.
        "min_sites": cfg.sampled_per_round, "strategy": rule_name(cfg.strategy), "listen": "127.0.0.1:0",
        "state_dir": str(out / "unused-state"), "registry_dir": str(out / "unused-registry"),
        "tls": {"ca": "unused", "cert": "unused", "key": "unused"},
        "lora": {"rank": cfg.rank, "alpha": 2.0 * cfg.rank, "seed": cfg.seed},
        "training": {"max_steps": cfg.steps, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
                     "max_length": 128, "seed": cfg.seed, "lr_scheduler_type": "constant"},
    }
    path = out / "federation.toml"
    write_durable(path, dumps(doc).encode())
    return path


def client_app_dir(out: Path, run_config: dict[str, Any]) -> Path:
    """A Flower app folder whose ``pyproject.toml`` carries the run config every virtual site reads.

    Flower 1.42's ``run_simulation`` hands the nodes an empty run config unless the run comes from an app folder, so
    the simulation names one (the apps themselves are the installed packages, as in ``deploy/flower``).
    """
    from fedcommon.tomlconfig import dumps

    doc = {"project": {"name": "fedbridge-simulate", "version": "0.1.0", "description": "fedbridge simulate"},
           "tool": {"flwr": {"app": {"publisher": "fedbridge",
                                     "components": {"serverapp": "coordinator.flower.serverapp:app",
                                                    "clientapp": "site_agent.flower.clientapp:app"},
                                     "config": run_config}}}}
    folder = out / "app"
    folder.mkdir(parents=True, exist_ok=True)
    write_durable(folder / "pyproject.toml", dumps(doc).encode())
    return folder


def _ray_temp(out: Path) -> tuple[Path, bool]:
    """Ray's temp folder: under ``out`` when its sockets' paths fit the 107-byte limit of a unix socket, else a short
    private folder in /tmp (removed after the run). Returns (folder, remove_after)."""
    import tempfile

    # Ray puts "session_<date>_<time>_<pid>/sockets/plasma_store" (~70 bytes) under it.
    here = Path(out).resolve() / "ray"
    if len(str(here)) <= 35:
        return here, False
    return Path(tempfile.mkdtemp(prefix="fbray-", dir="/tmp")), True


def _simulation_run(flwr_sim: Any, run_config: dict[str, Any]) -> Any:
    """The ``Run`` Flower's ``run_simulation`` makes for itself, with the run config as its overrides.

    ``run_simulation`` (1.42) takes no run config: this is its own set-up (flwr/simulation/run_simulation.py,
    ``_run_simulation`` without a ``run``) with ``override_config`` filled in, which the nodes' contexts fuse with the
    app folder's ``[tool.flwr.app.config]``.
    """
    run_id = flwr_sim.generate_rand_int_from_bytes(flwr_sim.RUN_ID_NUM_BYTES)
    run = flwr_sim.Run.create_empty(run_id=run_id)
    run.primary_task_id = flwr_sim.generate_rand_int_from_bytes(flwr_sim.TASK_ID_NUM_BYTES)
    run.federation_id = flwr_sim.NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    flwr_sim.TaskIdentity.task_id = 1
    flwr_sim.TaskIdentity.run_id = run_id
    flwr_sim.TaskIdentity.node_id = flwr_sim.SUPERLINK_NODE_ID
    return run


def run(cfg: SimulateConfig, console: Any = None) -> SimulationResult:
    """Run the simulation ``cfg`` describes; write and return its results (see the module docstring).

    Raises:
        RuntimeError: The simulation failed (Flower's own error, with the ServerApp's cause chained).
    """
    import shutil

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage telemetry would leave the machine
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flwr.app import Context, MetricRecord, RecordDict
    from flwr.serverapp import ServerApp

    # The module (flwr.simulation's run_simulation attribute is the function of the same name).
    flwr_sim = importlib.import_module("flwr.simulation.run_simulation")

    from coordinator.flower.serverapp import run_federation
    from fedcommon import flowerwire as fw
    from sandbox.partition import write_partition
    from sandbox.tiny_model import build_tiny_model
    from site_agent.flower.clientapp import app as client_app

    # Flower's INFO lines are per message: the table is the output.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.base_model).resolve() if cfg.base_model else build_tiny_model()
    part = write_partition(out / "data", cfg.sites, cfg.alpha, cfg.seed, cfg.rows_per_site, cfg.heldout_per_class)
    fed_toml = federation_toml(cfg, base, out)
    threads = max(1, int(cfg.client_cpus))  # each virtual site's torch threads: its share of the CPUs
    run_config: dict[str, Any] = {"partition-dir": str(part.out_dir), "base-model": str(base),
                                  "work-dir": str(out / "sites"), "threads": threads}
    if cfg.lora_ranks:
        run_config["lora-ranks"] = ",".join(str(r) for r in cfg.lora_ranks)
    app_dir = client_app_dir(out, run_config)
    ray_temp, remove_temp = _ray_temp(out)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config["alpha"] = cfg.alpha if math.isfinite(cfg.alpha) else "inf"
    result = SimulationResult(config, math.nan, memory_scope=(
        "driver + local Ray processes" if cfg.ray_address is None else "driver and this machine's Ray processes only"))
    scorer: HeldoutScorer | None = None
    marks: dict[str, float] = {}

    def say(text: str) -> None:
        if console is not None:
            console.print(text, highlight=False, markup=False)

    def evaluate(strategy: Any, server_round: int, arrays: Any) -> Any:
        nonlocal scorer
        now = time.perf_counter()
        state = fw.record_state(arrays, "global adapter")
        if scorer is None:
            scorer = HeldoutScorer(base, part.heldout_path, strategy.task_for_round(1).adapter_spec,
                                   out / "eval")
        scorer.trainer.set_base_residual(dict(strategy.residual))  # FedEx-LoRA: the cumulative residual
        loss = scorer.loss(state)
        if server_round == 0:
            result.initial_loss = loss
            result.startup_s = time.perf_counter() - start
            say(f"[simulate] {cfg.sites} sites ready after {result.startup_s:.1f} s; held-out loss {loss:.4f}")
        else:
            info = strategy.last_info
            result.rounds.append(RoundRow(server_round, now - marks["round_start"], loss, cfg.sampled_per_round,
                                          int(info.get("num_updates", 0)), sampler.peak_mib))
            say(f"[simulate] round {server_round}/{cfg.rounds}: {result.rounds[-1].wall_s:.1f} s, held-out loss "
                f"{loss:.4f}, {result.rounds[-1].replied} updates, peak RSS {sampler.peak_mib:.0f} MiB")
        marks["round_start"] = time.perf_counter()
        return MetricRecord({"heldout-loss": loss})

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        run_federation(grid, fed_toml, out / "final", fraction_train=cfg.fraction, fraction_evaluate=0.0,
                       evaluate_fn=evaluate)

    run_ = _simulation_run(flwr_sim, run_config)
    sampler = MemorySampler()
    if threading.current_thread() is threading.main_thread():
        import signal

        def _terminate(signum: int, _frame: Any) -> None:
            # SIGTERM would end the process without running the finally below: Ray's processes and the private temp
            # folder would be left. Raise instead, so the same clean-up as for an error runs.
            raise SimulationError(f"stopped by signal {signum}")

        signal.signal(signal.SIGTERM, _terminate)
    say(f"[simulate] {cfg.sites} sites, {cfg.rounds} rounds, alpha {cfg.alpha:g}, fraction {cfg.fraction:g}, "
        f"{cfg.strategy}; Ray: {cfg.ray_address or 'local'}")
    try:
        with sampler:
            start_ray(backend_config(cfg, ray_temp)["init_args"])
            result.ray = ray_info()
            flwr_sim._run_simulation(
                num_supernodes=cfg.sites, exit_event=flwr_sim.EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app, server_app=server_app, backend_config=backend_config(cfg, ray_temp),
                app_dir=str(app_dir), is_app=True, run=run_,
                server_app_context=Context(run_id=run_.run_id, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=dict(run_config)))
    except SimulationError:
        raise
    except RuntimeError as e:  # Flower's "An error was encountered. Ending simulation.", the cause chained
        cause = e.__cause__ or e
        raise SimulationError(f"the simulation failed after {len(result.rounds)} of {cfg.rounds} rounds: "
                              f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''} "
                              "(Flower's log above has the details)") from None
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if remove_temp:
            shutil.rmtree(ray_temp, ignore_errors=True)
    if len(result.rounds) != cfg.rounds:
        raise SimulationError(f"the simulation ended after {len(result.rounds)} of {cfg.rounds} rounds (see the log "
                           "above)")
    result.total_wall_s = time.perf_counter() - start
    result.peak_rss_mib = sampler.peak_mib
    write_results(result, out)
    say(results_table(result))
    say(f"[simulate] wrote {out / 'results.json'}, results.md, results.csv")
    return result
