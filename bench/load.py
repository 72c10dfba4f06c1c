"""Load: many concurrent lightweight sites against one real coordinator process, for several rounds.

Each site is a thread running the project's own site client (:class:`site_agent.client.CoordinatorClient`: mutual
TLS with the site's own dev-PKI certificate, resumable upload and download) and envelope signing
(:func:`protos.codec.sign_envelope`, the site's Ed25519 key). It does what an agent does on the wire and nothing
else: Join, long-poll FetchTask, download the global adapter, upload a signed update shaped exactly like the round's
adapter spec (random small values; no training), and after the last round the empty final report. The quorum is
every site (``min_sites`` = N), so each round closes only when all N updates are in.

The sites run in a few worker processes (``--worker``), so the Python clients are not one GIL's bottleneck; the
coordinator is a separate process (:mod:`sandbox.localfed`), sampled every 50 ms through ``/proc/<pid>/status``
(VmRSS) and ``/proc/<pid>/stat`` (utime + stime).

Measured, for N = 50, 100, 200 (``--sites``):

- upload-acknowledgement latency: from the moment gRPC takes an upload's last chunk to the coordinator's
  ``accepted`` answer (the coordinator assembling, checking, storing and auditing the update, with every site of
  the round uploading at once), p50 and p99; goal p99 < 1 s on loopback. Beside it, information only, the whole
  upload (from the UploadUpdate call to the answer): on one 2-core machine the N clients' own TLS and chunking
  share the cores with the coordinator, so that time measures the load generator as much as the coordinator;
- the coordinator's peak RSS and peak CPU (cores, over 0.5 s windows);
- its peak RSS in each round, and the drift: last round's peak against the first's (goal: flat, at most
  first × 1.1 + 16 MiB);
- the RSS slope per site across N (least squares of peak RSS on N) and its linearity (the largest N's peak over
  the line through the smaller ones).

Run: ``python -m bench.load`` (about 2 minutes on 2 cores), or ``--sites 10 --rounds 1`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import Row, write_results  # noqa: E402

RANK = 16
P99_GOAL_S = 1.0
DRIFT_FACTOR, DRIFT_SLACK = 1.1, 16 << 20
SAMPLE_S = 0.05
CPU_WINDOW_S = 0.5


# -- the coordinator's resources ---------------------------------------------------------------------------------
class ProcSampler:
    """Samples a process's RSS (bytes) and cumulative CPU time (s) from /proc in a background thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, float]] = []  # (monotonic time, rss bytes, cpu seconds)
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> tuple[int, float] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)
        if rss is None:  # a zombie: the process has exited
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return rss, (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self.read()
            if got is None:
                return
            self.samples.append((time.monotonic(), *got))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak_rss(self, t0: float = float("-inf"), t1: float = float("inf")) -> int:
        return max((r for t, r, _ in self.samples if t0 <= t < t1), default=0)

    def peak_cpu(self) -> float:
        """The most cores used over any ``CPU_WINDOW_S`` window."""
        best, j = 0.0, 0
        for i in range(len(self.samples)):
            while j < i and self.samples[i][0] - self.samples[j][0] > CPU_WINDOW_S:
                j += 1
            if i > j:
                dt = self.samples[i][0] - self.samples[j][0]
                if dt >= CPU_WINDOW_S / 2:
                    best = max(best, (self.samples[i][2] - self.samples[j][2]) / dt)
        return best


# -- the sites (worker processes) --------------------------------------------------------------------------------
def _payload(spec: Any, seed: int) -> bytes:
    import torch

    from fedcommon import tensors

    g = torch.Generator().manual_seed(seed)
    return tensors.encode_state({t.name: (torch.randn(*t.shape, generator=g) * 1e-3).to(tensors.torch_dtype(t.dtype))
                                 for t in spec.tensors})


def run_site(name: str, kit: Path, coordinator: str, results: list[dict[str, Any]], errors: list[str],
             start: threading.Barrier | None = None) -> None:
    """One lightweight site: the agent's wire protocol with the project's client, no training."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from protos import codec
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.client import CoordinatorClient
    from site_agent.config import SiteConfig, SiteData, SiteTls

    cfg = SiteConfig(name=name, coordinator=coordinator, base_model=kit, work_dir=kit,
                     tls=SiteTls(kit / "ca.pem", kit / "client.pem", kit / "client.key", kit / "signing.key"),
                     data=SiteData(kit / "unused.jsonl"), fetch_wait_ms=5_000, retry_for_s=120)
    key = load_pem_private_key(cfg.tls.signing_key.read_bytes(), password=None)
    client = CoordinatorClient(cfg)
    try:
        if start is not None:
            start.wait()
        client.join("bench-load", 0)
        last = 0
        while True:
            resp = client.fetch_task(cfg.fetch_wait_ms)
            if resp.status == pb.TASK_STATUS_WAIT or (resp.status == pb.TASK_STATUS_TRAIN and resp.task.round <= last):
                continue
            task = resp.task
            if resp.status == pb.TASK_STATUS_DONE:
                client.report_metrics(task.round, "eval_global", {}, 0)
                return
            t_task = time.time()
            client.download_adapter(task.round, task.global_adapter_sha256, task.global_adapter_size)
            payload = _payload(task.adapter_spec, hash((name, task.round)) & 0xFFFFFFFF)
            env = codec.make_envelope(federation_id=task.federation_id, round=task.round, site=name,
                                      base_model_sha256=task.base_model_sha256, payload=payload,
                                      adapter_spec_sha256=task.adapter_spec.sha256, num_examples=10)
            signed = codec.sign_envelope(env, key)  # type: ignore[arg-type]
            sent: list[float] = []

            def progress(n: int, total: int = len(payload), sent: list[float] = sent) -> None:
                if n == total:  # gRPC has taken the last chunk: the upload is on its way, the answer is next
                    sent.append(time.time())

            t0 = time.time()
            client.upload(signed, env, payload, on_progress=progress)
            t1 = time.time()
            results.append({"site": name, "round": task.round, "task": t_task, "start": t0, "ack": t1,
                            "sent": sent[-1] if sent else None, "bytes": len(payload)})
            last = task.round
    except Exception as e:  # reported by the parent, which fails the run
        errors.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        client.close()


def worker_main(spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    threads = [threading.Thread(target=run_site, args=(s["name"], Path(s["kit"]), spec["coordinator"], results,
                                                       errors), daemon=True) for s in spec["sites"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out_path.write_text(json.dumps({"results": results, "errors": errors}))


# -- one run -----------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    sites: int
    rounds: int
    latencies: list[float]  # the whole upload: UploadUpdate called -> accepted
    ack_latencies: list[float]  # the acknowledgement: last chunk handed to gRPC -> accepted
    payload_bytes: int
    peak_rss: int
    idle_rss: int
    round_peaks: list[int]
    peak_cpu: float
    cpu_s: float
    wall_s: float


def federation(root: Path, n_sites: int, rounds: int, rank: int) -> Any:
    """A federation of ``n_sites`` dev-PKI sites on the tiny base (the same layout :func:`sandbox.localfed.prepare`
    writes, without the per-site training data these sites never read)."""
    from coordinator.trust.pki import create_dev_pki
    from fedcommon.tomlconfig import dumps
    from sandbox.localfed import LocalFederation
    from sandbox.tiny_model import build_tiny_model

    base = build_tiny_model()
    names = [f"site-{i:03d}" for i in range(n_sites)]
    pki = create_dev_pki(root / "pki", names)
    state_dir = root / "coordinator" / "state"
    cfg = {"federation_id": "load", "base_model": str(base), "base_model_ref": "fedbridge/tiny-llama",
           "rounds": rounds, "min_sites": n_sites, "listen": "127.0.0.1:0", "state_dir": str(state_dir),
           "registry_dir": str(root / "published"), "exit_when_done": True,
           "tls": {"ca": str(pki.ca_cert), "cert": str(pki.server_cert), "key": str(pki.server_key)},
           "lora": {"rank": rank, "alpha": 2.0 * rank, "target_modules": ["all-linear"]}}
    toml = root / "coordinator" / "federation.toml"
    toml.parent.mkdir(parents=True, exist_ok=True)
    toml.write_text(dumps(cfg))
    return LocalFederation(root, toml, state_dir, root / "published", [], {n: k.dir for n, k in pki.sites.items()},
                           base, None)


def run(n_sites: int, rounds: int, workers: int, rank: int = RANK, timeout: float = 600.0) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="fedbridge-load-") as tmp:
        root = Path(os.environ.get("FEDBRIDGE_LOAD_KEEP") or tmp)
        fed = federation(root, n_sites, rounds, rank)
        with fed:
            port = fed.start_coordinator()
            pid = fed.procs["coordinator"].pid
            with ProcSampler(pid) as sampler:
                time.sleep(0.5)
                idle_rss = sampler.peak_rss()
                names = sorted(fed.site_kits)
                procs, outs = [], []
                t_start = time.monotonic()
                for w in range(workers):
                    part = names[w::workers]
                    if not part:
                        continue
                    spec, out = root / f"worker{w}.json", root / f"worker{w}.out.json"
                    spec.write_text(json.dumps({"coordinator": f"127.0.0.1:{port}",
                                                "sites": [{"name": n, "kit": str(fed.site_kits[n])} for n in part]}))
                    procs.append(subprocess.Popen([sys.executable, "-m", "bench.load", "--worker", str(spec), str(out)],
                                                  cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")))
                    outs.append(out)
                deadline = time.monotonic() + timeout
                for p in procs:
                    p.wait(max(1.0, deadline - time.monotonic()))
                codes = fed.wait(["coordinator"], timeout=max(1.0, deadline - time.monotonic()))
                wall = time.monotonic() - t_start
            results, errors = [], []
            for out in outs:
                got = json.loads(out.read_text()) if out.exists() else {"results": [], "errors": [f"{out}: missing"]}
                results += got["results"]
                errors += got["errors"]
            if errors or codes["coordinator"] != 0 or len(results) != n_sites * rounds:
                raise RuntimeError(f"load run N={n_sites} failed: coordinator exit {codes['coordinator']}, "
                                   f"{len(results)}/{n_sites * rounds} uploads, errors: {errors[:5]}\n"
                                   + fed.log_path("coordinator").read_text(errors="replace")[-3000:])
    # Round windows on the sampler's clock: round r runs from its first task until round r+1's first task.
    offset = time.time() - time.monotonic()
    starts = [min(r["task"] for r in results if r["round"] == k) - offset for k in range(1, rounds + 1)]
    ends = starts[1:] + [float("inf")]
    round_peaks = [sampler.peak_rss(a, b) for a, b in zip(starts, ends, strict=True)]
    cpu_s = sampler.samples[-1][2] - sampler.samples[0][2] if sampler.samples else 0.0
    return RunResult(n_sites, rounds, [r["ack"] - r["start"] for r in results],
                     [r["ack"] - r["sent"] for r in results if r["sent"] is not None], results[0]["bytes"],
                     sampler.peak_rss(), idle_rss, round_peaks, sampler.peak_cpu(), cpu_s, wall)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def rows_for(runs: list[RunResult]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    mib = float(1 << 20)
    for r in runs:
        p50, p99 = percentile(r.ack_latencies, 50), percentile(r.ack_latencies, 99)
        rows.append(Row(f"N={r.sites}: upload ack latency p50 (last chunk sent -> accepted)", p50, P99_GOAL_S,
                        p50 / P99_GOAL_S, "s", "informational", None))
        rows.append(Row(f"N={r.sites}: upload ack latency p99 (last chunk sent -> accepted; {len(r.ack_latencies)} "
                        f"of {len(r.latencies)} uploads, all sites at once)", p99, P99_GOAL_S, p99 / P99_GOAL_S, "s",
                        f"< {P99_GOAL_S:g} s", p99 < P99_GOAL_S and len(r.ack_latencies) == len(r.latencies)))
        w50, w99 = percentile(r.latencies, 50), percentile(r.latencies, 99)
        rows.append(Row(f"N={r.sites}: whole upload p50 (UploadUpdate called -> accepted)", w50, P99_GOAL_S,
                        w50 / P99_GOAL_S, "s", "informational", None))
        rows.append(Row(f"N={r.sites}: whole upload p99 (UploadUpdate called -> accepted; the sites' own clients "
                        "share the cores)", w99, P99_GOAL_S, w99 / P99_GOAL_S, "s", "informational", None))
        rows.append(Row(f"N={r.sites}: coordinator peak RSS (idle before the sites: {r.idle_rss / mib:.1f} MiB)",
                        r.peak_rss / mib, r.idle_rss / mib, r.peak_rss / max(r.idle_rss, 1), "MiB", "informational",
                        None))
        rows.append(Row(f"N={r.sites}: coordinator peak CPU (cores, {CPU_WINDOW_S:g} s windows; {r.cpu_s:.1f} CPU-s "
                        f"in {r.wall_s:.1f} s)", r.peak_cpu, float(os.cpu_count() or 1),
                        r.peak_cpu / (os.cpu_count() or 1), "cores", "informational", None))
        first, last = r.round_peaks[0], r.round_peaks[-1]
        bound = first * DRIFT_FACTOR + DRIFT_SLACK
        rows.append(Row(f"N={r.sites}: peak RSS, last round vs first (per round: "
                        f"{', '.join(f'{p / mib:.1f}' for p in r.round_peaks)} MiB)", last / mib, first / mib,
                        last / max(first, 1), "MiB", f"flat: <= first x {DRIFT_FACTOR:g} + {DRIFT_SLACK >> 20} MiB",
                        last <= bound))
    notes = [f"payload per site per round: {runs[0].payload_bytes} bytes (safetensors of the tiny base's LoRA r="
             f"{RANK} all-linear spec, as the coordinator's task states it); every upload goes through mTLS on "
             "127.0.0.1 with its own client certificate and an Ed25519-signed envelope"]
    if len(runs) >= 2:
        xs = [float(r.sites) for r in runs]
        ys = [float(r.peak_rss - r.idle_rss) for r in runs]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        rows.append(Row("coordinator RSS added per site (least-squares slope of peak - idle RSS on N)", slope / 1024,
                        runs[0].payload_bytes / 1024, slope / runs[0].payload_bytes, "KiB/site",
                        "informational (reference: payload bytes per site)", None))
        # Linear or better: the largest N's added RSS is at most what the line through the smaller runs predicts
        # (plus 10 % and 16 MiB of noise); with only two runs, at most proportional to N.
        small = runs[:-1]
        if len(small) >= 2:
            sx = [float(r.sites) for r in small]
            sy = [float(r.peak_rss - r.idle_rss) for r in small]
            a = (sy[-1] - sy[0]) / (sx[-1] - sx[0])
            pred = sy[-1] + a * (runs[-1].sites - sx[-1])
        else:
            pred = ys[0] * runs[-1].sites / runs[0].sites
        got = ys[-1]
        rows.append(Row(f"N={runs[-1].sites}: added RSS vs the linear extrapolation from smaller N", got / mib,
                        pred / mib, got / max(pred, 1.0), "MiB", "linear or better: <= predicted x 1.1 + 16 MiB",
                        got <= pred * 1.1 + (16 << 20)))
        notes.append(f"RSS per site: {slope / 1024:.1f} KiB (slope), against {runs[0].payload_bytes / 1024:.1f} KiB "
                     "of payload per site")
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="50,100,200", help="comma-separated site counts (default 50,100,200)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--name", default="load", help="results file name under bench/results/")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(Path(args.worker[0]), Path(args.worker[1]))
        return
    runs = [run(int(n), args.rounds, args.workers) for n in args.sites.split(",")]
    rows, notes = rows_for(runs)
    write_results(args.name, rows, notes)


if __name__ == "__main__":
    main()
