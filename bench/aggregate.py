"""Aggregation speed and memory: fedbridge's FedAvg vs Flower 1.42's FedAvg on the same inputs.

Run with no arguments (a few minutes on 2 cores); ``--quick`` runs one small case. Prints a markdown table and
writes ``bench/results/aggregate.json`` (schema in :mod:`bench.report`). How it is measured (also printed with the table):

* Inputs. A Llama-7B-shaped LoRA adapter (32 layers x q/k/v/o, hidden 4096) at r=8 (8.4M parameters) and r=64
  (67.1M), float32, N = 10, 50, 100 sites, random example counts. Both sides get the same numbers: Flower gets reply
  ``Message``s whose ``ArrayRecord`` holds each site's WEIGHTS (global + delta: Flower aggregates weights) and
  deserializes them inside ``aggregate_train``; ours gets the global adapter and each site's DELTA, either
  (a) from safetensors files in a temporary directory, each memory-mapped (header validated, tensors zero-copy
  views) inside the timed call and summed block by block (how the coordinator reads its durable store; the files
  are in the page cache, as fresh uploads are), or
  (b) as a list of already-decoded tensors (how it holds updates it verified on arrival).
* Pool. 100 distinct 64M-parameter replies would need 25 GiB resident, more than these machines' 24 GiB, and
  Flower's ``aggregate_train`` takes all replies at once. So both sides' N inputs cycle through the same pool of P
  distinct updates (P = 8 at 8M, 4 at 64M); one update is 32-256 MiB, far beyond any CPU cache, so reuse gives
  neither side a cache advantage. The outputs are checked to agree (max |difference| printed).
* Allocator. On these VMs the first touch of a fresh page is slow and very noisy (other tenants move it by 10x),
  which would swamp the arithmetic being compared. So the process keeps freed memory in its heap (``mallopt``: no
  trimming, chunks up to 32 MiB from the heap), for torch and numpy alike, and every timed call follows an untimed
  one that maps the memory it needs.
* Memory. During the untimed call per side and case, a thread samples glibc's ``mallinfo2`` (bytes malloc has
  handed out: torch, numpy and ``bytes`` all allocate there) every 0.5 ms; the peak above the pre-call level is
  what the aggregation adds on top of its already-resident inputs. Ours from files maps the stored updates from
  the page cache, which is file-backed, not heap. Goal: ours flat in N. Flower's
  call is flat in N too once its inputs are resident, but it needs all N replies resident first (printed).
* Time. Best of R calls (R = 3 at 8M, 2 at 64M), wall clock, on 1 torch thread, like Flower's single-threaded
  numpy arithmetic. On a 2-core machine shared with other work, torch's 2-thread kernels wait on each other and
  can be several times slower, so one row per size shows ours at torch's default thread count too.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coordinator.rounds.mapped import map_state
from strategies.registry import build_strategy
from strategies.types import ClientUpdate, StateDict

LAYERS, HIDDEN, MODULES = 32, 4096, ("q_proj", "k_proj", "v_proj", "o_proj")
RESULTS = Path(__file__).resolve().parent / "results" / "aggregate.json"
SPEED_GOAL = 3.0
FLAT_SLACK = 1.10  # ours at N is "flat" when within 10% (+16 MiB) of ours at the smallest N
FLAT_ABS_MIB = 16.0


@dataclass(frozen=True)
class Size:
    label: str
    rank: int
    pool: int
    repeats: int


SIZES = (Size("8M", 8, 8, 3), Size("64M", 64, 4, 2))
NS = (10, 50, 100)


# ---------------------------------------------------------------- memory probe
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


if _LIBC is not None:
    _LIBC.mallinfo2.restype = _Mallinfo2


def retain_heap() -> bool:
    """Keep freed memory in the process heap (no trimming; chunks up to 32 MiB from the heap, not mmap).

    On these VMs the first touch of a fresh page is slow and very noisy (others' load moves it by 10x), which would
    swamp the arithmetic being compared. Retaining the heap means that after one untimed call, every timed call of
    either side reuses already-mapped memory. Applies to both sides (torch and numpy both allocate through malloc).
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, 2**30))


def heap_in_use() -> int:
    """Bytes malloc has handed out and not got back (glibc ``mallinfo2``: uordblks + hblkhd, all arenas)."""
    if _LIBC is None:
        raise RuntimeError("the memory probe needs glibc (Linux)")
    m = _LIBC.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def peak_memory(fn: Callable[[], Any], period_s: float = 5e-4) -> tuple[float, Any]:
    """Run ``fn`` once, untimed: (peak heap bytes in use above the pre-call level, in MiB; result).

    A thread samples :func:`heap_in_use` every ``period_s`` (and the GIL switch interval is lowered meanwhile), so
    allocations living shorter than that can be missed; the structures that set the peak (sums, outputs, the
    replies' decoded arrays) live far longer. torch, numpy and Python ``bytes`` all allocate through malloc.
    """
    gc.collect()
    base = heap_in_use()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, heap_in_use())
            time.sleep(period_s)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
        sys.setswitchinterval(switch)
    peak = max(peak, heap_in_use())
    return (peak - base) / 2**20, out


def best_time(repeats: int, fn: Callable[[], Any]) -> float:
    """Best wall-clock seconds of ``repeats`` calls (after the caller's untimed warm-up call)."""
    best = math.inf
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return best


# ---------------------------------------------------------------- inputs
def adapter_keys() -> list[tuple[str, tuple[int, int]]]:
    keys = []
    for layer in range(LAYERS):
        for m in MODULES:
            base = f"base_model.model.model.layers.{layer}.self_attn.{m}"
            keys.append((f"{base}.lora_A.weight", (0, HIDDEN)))
            keys.append((f"{base}.lora_B.weight", (HIDDEN, 0)))
    return keys


def random_state(rank: int, seed: int, scale: float) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for k, (a, b) in adapter_keys():
        shape = (rank, b) if a == 0 else (a, rank)
        out[k] = torch.randn(shape, generator=g) * scale
    return out


@dataclass
class Inputs:
    global_state: StateDict
    deltas: list[StateDict]  # the pool
    files: list[Path]  # the pool as stored safetensors files
    records: list[Any]  # the pool as Flower RecordDicts (weights = global + delta)
    weights: list[int]  # examples per site, for the largest N
    params: int
    nbytes: int


def build_inputs(size: Size, max_n: int, store: Path) -> Inputs:
    from flwr.app import Array, ArrayRecord

    g = random_state(size.rank, 0, 0.02)
    deltas = [random_state(size.rank, i + 1, 0.01) for i in range(size.pool)]
    files = [store / f"{size.label}-update{i}.safetensors" for i in range(size.pool)]
    for d, f in zip(deltas, files, strict=True):
        save_file(d, f)
    rng = random.Random(0)
    weights = [rng.randint(100, 5000) for _ in range(max_n)]
    records = []
    for d in deltas:
        arrays = ArrayRecord({k: Array(np.ascontiguousarray((g[k] + d[k]).numpy())) for k in g})
        records.append(arrays)
    params = sum(v.numel() for v in g.values())
    return Inputs(g, deltas, files, records, weights, params, params * 4)


def flower_replies(inp: Inputs, n: int) -> list[Any]:
    from flwr.app import Message, MessageType, MetricRecord, RecordDict

    msgs = []
    for i in range(n):
        content = RecordDict({"arrays": inp.records[i % len(inp.records)],
                              "metrics": MetricRecord({"num-examples": inp.weights[i]})})
        msgs.append(Message(content=content, dst_node_id=i + 1, message_type=MessageType.TRAIN))
    return msgs


def ours_from_files(inp: Inputs, n: int) -> list[ClientUpdate]:
    """Updates as the coordinator reads its durable store: each stored safetensors file memory-mapped, zero copy.

    Mapping validates each file's header; the tensors are views of the page cache, read once while summed.
    """
    return [ClientUpdate(site=f"site{i:03d}", delta=map_state(inp.files[i % len(inp.files)]),
                         num_examples=inp.weights[i]) for i in range(n)]


def ours_from_tensors(inp: Inputs, n: int) -> list[ClientUpdate]:
    return [ClientUpdate(site=f"site{i:03d}", delta=inp.deltas[i % len(inp.deltas)], num_examples=inp.weights[i])
            for i in range(n)]


# ---------------------------------------------------------------- runs
def max_abs_diff(ours: StateDict, flower_arrays: Any) -> float:
    return max(float(np.max(np.abs(ours[k].numpy() - flower_arrays[k].numpy()))) for k in ours)


def run_size(size: Size, ns: tuple[int, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of one adapter size (the pool's safetensors files live in a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="fedbridge-bench-") as store:
        return _run_size(size, ns, build_inputs(size, max(ns), Path(store)))


def _run_size(size: Size, ns: tuple[int, ...], inp: Inputs) -> tuple[list[dict[str, Any]], list[str]]:
    from flwr.serverapp.strategy import FedAvg

    strategy = build_strategy("fedavg", {})
    threads = torch.get_num_threads()
    mib = inp.nbytes / 2**20
    print(f"[bench] {size.label}: {inp.params / 1e6:.1f}M params ({mib:.0f} MiB fp32), pool {size.pool}, "
          f"best of {size.repeats}", file=sys.stderr)
    ref = FedAvg()

    def flower(n: int) -> Callable[[], Any]:
        replies = flower_replies(inp, n)  # built outside the timed call, as Flower receives them
        return lambda: ref.aggregate_train(1, replies)[0]

    def ours_files(n: int) -> Callable[[], Any]:
        return lambda: strategy.aggregate(inp.global_state, ours_from_files(inp, n))

    def ours_tensors(n: int) -> Callable[[], Any]:
        return lambda: strategy.aggregate(inp.global_state, ours_from_tensors(inp, n))

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    goal = f">= {SPEED_GOAL:g}x faster"
    ours_mem_first: float | None = None
    torch.set_num_threads(1)  # numpy's arithmetic in Flower is single-threaded: compare like with like
    try:
        for n in ns:
            # Memory first: one untimed call per side, which also maps the heap the timed calls then reuse.
            fl_fn, of_fn, ot_fn = flower(n), ours_files(n), ours_tensors(n)
            fl_mem, fl_out = peak_memory(fl_fn)
            of_mem, of_out = peak_memory(of_fn)
            diff = max_abs_diff(of_out.state, fl_out)
            del fl_out, of_out
            ot_mem, _ = peak_memory(ot_fn)
            fl_s = best_time(size.repeats, fl_fn)
            of_s = best_time(size.repeats, of_fn)
            ot_s = best_time(size.repeats, ot_fn)
            if ours_mem_first is None:
                ours_mem_first = of_mem
            flat = of_mem <= FLAT_SLACK * ours_mem_first + FLAT_ABS_MIB
            case = f"fedavg {size.label} N={n}"
            rows.append(_row(f"{case}: time, ours from stored safetensors files (mmap) vs Flower from its Messages",
                             of_s, fl_s, fl_s / of_s, "s", goal, fl_s / of_s >= SPEED_GOAL))
            rows.append(_row(f"{case}: time, ours from decoded tensors (list) vs Flower from its Messages",
                             ot_s, fl_s, fl_s / ot_s, "s", goal, fl_s / ot_s >= SPEED_GOAL))
            rows.append(_row(f"{case}: peak heap added by the call, ours from stored files", of_mem, fl_mem,
                             fl_mem / of_mem if of_mem else math.inf, "MiB",
                             f"ours flat in N (<= {FLAT_SLACK:g} x N={ns[0]} + {FLAT_ABS_MIB:g} MiB)", flat))
            notes.append(f"{case}: max |ours - Flower| = {diff:.2e}; ours from tensors adds {ot_mem:.0f} MiB of "
                         f"heap; Flower needs its {n} replies resident before the call ({n * mib / 1024:.2f} GiB if "
                         f"distinct), ours maps the stored files (page cache, file-backed)")
            print(f"[bench] {case}: ours {of_s:.3f}s files / {ot_s:.3f}s tensors, Flower {fl_s:.3f}s; "
                  f"heap {of_mem:.0f} / {ot_mem:.0f} / {fl_mem:.0f} MiB", file=sys.stderr)
            if n == min(ns) and threads > 1:
                torch.set_num_threads(threads)
                try:
                    peak_memory(ot_fn)  # warm-up at this thread count
                    multi = best_time(size.repeats, ot_fn)
                finally:
                    torch.set_num_threads(1)
                rows.append(_row(f"{case}: time, ours from decoded tensors on {threads} torch threads vs Flower",
                                 multi, fl_s, fl_s / multi, "s", goal, fl_s / multi >= SPEED_GOAL))
    finally:
        torch.set_num_threads(threads)
    return rows, notes


def run(sizes: tuple[Size, ...], ns: tuple[int, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every size, then the environment notes."""
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    retained = retain_heap()
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for size in sizes:
        size_rows, size_notes = run_size(size, ns)
        rows += size_rows
        notes += size_notes
        gc.collect()
    notes.append(f"heap retention (mallopt) {'on' if retained else 'OFF'}; "
                 f"torch threads: {torch.get_num_threads()}; CPU cores: {os.cpu_count()}; torch {torch.__version__}; "
                 f"1-min load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} (a shared machine: "
                 f"both sides ran interleaved under the same load)")
    return rows, notes


def _row(case: str, ours: float, reference: float, ratio: float, unit: str, goal: str, meets: bool
         ) -> dict[str, Any]:
    return {"case": case, "ours": round(ours, 4), "reference": round(reference, 4), "ratio": round(ratio, 2),
            "unit": unit, "goal": goal, "meets_goal": bool(meets)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | ours | Flower | ratio (Flower/ours) | unit | goal | meets |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['ours']:.3f} | {r['reference']:.3f} | {r['ratio']:.2f} | {r['unit']} | "
                     f"{r['goal']} | {'yes' if r['meets_goal'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case (8M, N=10) as a smoke test")
    args = parser.parse_args()
    sizes = (Size("8M", 8, 4, 1),) if args.quick else SIZES
    ns = (10,) if args.quick else NS
    t0 = time.perf_counter()
    rows, notes = run(sizes, ns)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"bench": "aggregate", "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print()
    pools = ", ".join(f"{s.label}: {s.pool}" for s in sizes)
    print("ratio = Flower / ours for time and memory (higher is better for ours). Time: best of R after an untimed "
          "call, heap retained, 1 torch thread unless the case says otherwise (see the module docstring). Memory: "
          "peak heap bytes in use (glibc mallinfo2, sampled every 0.5 ms) added by the untimed call.")
    print(f"Inputs: both sides cycle through the same pool of distinct updates ({pools}); 100 distinct 64M replies "
          "would need 25 GiB, more than the 24 GiB here. Ours sums float32 updates in float32, in site-name order, so "
          "the result does not depend on arrival order (Flower sums float32 in arrival order).")
    for note in notes:
        print(f"- {note}")
    print(f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS} "
          f"in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
