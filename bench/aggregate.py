"""Aggregation speed against this machine's memory bandwidth, with plain torch and Flower 1.42 as references.

Run with no arguments (several minutes on 2 cores); ``--quick`` runs one small case, ``--no-flower`` skips Flower.
Prints a markdown table and writes ``bench/results/aggregate.json`` (schema in :mod:`bench.report`). How it is
measured (also printed with the table):

* Goal (the physical reference). FedAvg must read every update once: N x the update's tensor bytes. Those bytes
  divided by the time of the real FedAvg path (``strategies.fedavg`` through ``build_strategy``, on the stored
  safetensors files memory-mapped as the coordinator's round step reads them) are set against this machine's memcpy
  bandwidth (bytes copied per second, glibc ``memcpy`` of a 512 MiB buffer, best of 5), measured in the same run
  right before each case. Goal >= 0.5 on 1 thread; 2 threads (both the copy and FedAvg) are reported too.
* References, information only (goal "informational", no ``meets_goal``): a plain torch weighted sum on the same
  updates as decoded tensors in memory (one float32 sum per key, each update added in place), and Flower's FedAvg
  on reply ``Message``s whose ``ArrayRecord`` holds each site's WEIGHTS (global + delta: Flower aggregates weights),
  deserialized inside ``aggregate_train``. The outputs are checked to agree (max |difference| printed).
* Inputs. A Llama-7B-shaped LoRA adapter (32 layers x q/k/v/o, hidden 4096) at r=8 (8.4M parameters) and r=64
  (67.1M), float32, N = 10, 50, 100 sites, random example counts; the global adapter and each site's DELTA.
* Pool. Every side's N inputs cycle through one pool of P distinct updates. P is the largest N where the pool fits
  half of this machine's memory (each update is held three times: its stored file in the page cache, decoded for
  the in-memory references, and as a Flower record; twice with ``--no-flower``), and at least twice the last-level
  cache in bytes (these Xeons report a 504 MiB L3, which holds eight 32 MiB updates). Each timed call of ours and
  of plain torch starts N updates further along the pool than the call before, so no call finds what the previous
  one read still cached.
  Where N <= P every byte counted is read from memory, and the goal applies. Where N > P (64M at N = 50 and 100:
  100 distinct updates are 25 GiB, more than these machines' 24 GiB) each call reads some updates more than once,
  and the blocked sum finds those blocks in cache: such cases are reported as information only, and say so.
* Allocator. On these VMs the first touch of a fresh page is slow and very noisy (other tenants move it by 10x),
  which would swamp the arithmetic being compared. So the process keeps freed memory in its heap (``mallopt``: no
  trimming, chunks up to 32 MiB from the heap), for torch and numpy alike, and every timed call follows an untimed
  one that maps the memory it needs.
* Memory. During the untimed call, a thread samples glibc's ``mallinfo2`` (bytes malloc has handed out: torch,
  numpy and ``bytes`` all allocate there) every 0.5 ms; the peak above the pre-call level is what the aggregation
  adds on top of its already-resident inputs. Ours from files maps the stored updates from the page cache, which
  is file-backed, not heap. Goal: ours flat in N. Flower needs all N replies resident first (printed).
* Time. Best of R calls (R = 3 at 8M, 2 at 64M), wall clock.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import INFORMATIONAL, Row, write_results
from coordinator.rounds.mapped import map_state
from strategies.registry import build_strategy
from strategies.types import ClientUpdate, StateDict

LAYERS, HIDDEN, MODULES = 32, 4096, ("q_proj", "k_proj", "v_proj", "o_proj")
BANDWIDTH_GOAL = 0.5  # FedAvg's read bandwidth from stored files, 1 thread, as a fraction of memcpy's
THREADS_2 = 2
MEMCPY_BYTES = 512 * 2**20
MEMCPY_REPEATS = 5
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
    _LIBC.memcpy.restype = ctypes.c_void_p
    _LIBC.memcpy.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


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
def last_level_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs, cpu0), in bytes; 0 where it reports none."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


def update_bytes(rank: int) -> int:
    """Bytes of one float32 update of the bench's adapter at ``rank`` (A and B of every module)."""
    return sum(math.prod((a or rank, b or rank)) for _, (a, b) in adapter_keys()) * 4


def memory_bytes() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pool_for(size: Size, update_bytes: int, cache_bytes: int, max_n: int, memory: int, copies: int = 3) -> Size:
    """``size`` with a pool of distinct updates: ``max_n`` of them where their ``copies`` fit in half of ``memory``
    (see the module docstring), else as many as fit; at least twice ``cache_bytes`` of them, never fewer than stated."""
    fit = memory // 2 // (copies * update_bytes)
    return replace(size, pool=max(size.pool, math.ceil(2 * cache_bytes / update_bytes), min(max_n, fit)))


class Rotation:
    """Where the next call's N updates start in the pool: ``take(n)`` returns the start and moves it on by n."""

    def __init__(self) -> None:
        self.at = 0

    def take(self, n: int) -> int:
        at, self.at = self.at, self.at + n
        return at


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


def build_inputs(size: Size, max_n: int, store: Path, flower: bool = True) -> Inputs:
    g = random_state(size.rank, 0, 0.02)
    deltas = [random_state(size.rank, i + 1, 0.01) for i in range(size.pool)]
    files = [store / f"{size.label}-update{i}.safetensors" for i in range(size.pool)]
    for d, f in zip(deltas, files, strict=True):
        save_file(d, f)
    rng = random.Random(0)
    weights = [rng.randint(100, 5000) for _ in range(max_n)]
    records = []
    for d in deltas if flower else ():
        from flwr.app import Array, ArrayRecord

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


def ours_from_files(inp: Inputs, n: int, start: int = 0) -> list[ClientUpdate]:
    """Updates as the coordinator reads its durable store: each stored safetensors file memory-mapped, zero copy.

    Mapping validates each file's header; the tensors are views of the page cache, read once while summed. Site i
    gets pool entry ``start + i`` (cyclic) and example count ``weights[i]``.
    """
    return [ClientUpdate(site=f"site{i:03d}", delta=map_state(inp.files[(start + i) % len(inp.files)]),
                         num_examples=inp.weights[i]) for i in range(n)]


def ours_from_tensors(inp: Inputs, n: int, start: int = 0) -> list[ClientUpdate]:
    return [ClientUpdate(site=f"site{i:03d}", delta=inp.deltas[(start + i) % len(inp.deltas)],
                         num_examples=inp.weights[i]) for i in range(n)]


# ---------------------------------------------------------------- references
_COPY_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def memcpy_bandwidth(threads: int, nbytes: int = MEMCPY_BYTES, repeats: int = MEMCPY_REPEATS) -> float:
    """This machine's memcpy bandwidth now, in bytes copied per second: best of ``repeats`` copies of ``nbytes``.

    The copy is glibc's ``memcpy`` (through ctypes, which lets go of the GIL), on ``threads`` Python threads that
    each copy their own slice at once; without glibc, torch's ``copy_`` on ``threads`` torch threads. Both buffers
    are ``nbytes`` (far beyond any last-level cache), allocated and touched once per size and reused, so a timed
    copy pays neither page faults nor first touches. The figure is bytes copied / time (a copy reads and writes
    each byte once), the convention of memcpy benchmarks.
    """
    if nbytes not in _COPY_BUFFERS:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        _COPY_BUFFERS[nbytes] = (src, torch.empty_like(src).copy_(src))
    src, dst = _COPY_BUFFERS[nbytes]
    if _LIBC is None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return nbytes / best_copy(lambda: dst.copy_(src), repeats)
        finally:
            torch.set_num_threads(before)
    part = nbytes // threads
    spans = [(dst.data_ptr() + i * part, src.data_ptr() + i * part) for i in range(threads)]

    def copy() -> None:
        if threads == 1:
            _LIBC.memcpy(ctypes.c_void_p(spans[0][0]), ctypes.c_void_p(spans[0][1]), ctypes.c_size_t(part))
            return
        workers = [threading.Thread(target=_LIBC.memcpy, args=(ctypes.c_void_p(d), ctypes.c_void_p(s_),
                                                                ctypes.c_size_t(part))) for d, s_ in spans]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return part * threads / best_copy(copy, repeats)


def best_copy(fn: Callable[[], Any], repeats: int) -> float:
    """Best seconds of ``repeats`` calls after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def plain_weighted_sum(global_state: StateDict, deltas: list[StateDict], weights: list[int]) -> StateDict:
    """The textbook torch FedAvg on in-memory tensors: one float32 sum per key, each update added in place."""
    sums = {k: torch.zeros_like(v) for k, v in global_state.items()}
    for d, w in zip(deltas, weights, strict=True):
        for k, acc in sums.items():
            acc.add_(d[k], alpha=float(w))
    total = float(sum(weights))
    return {k: torch.add(g, sums[k], alpha=1.0 / total) for k, g in global_state.items()}


# ---------------------------------------------------------------- runs
def max_abs_diff(ours: StateDict, flower_arrays: Any) -> float:
    return max(float(np.max(np.abs(ours[k].numpy() - flower_arrays[k].numpy()))) for k in ours)


def run_size(size: Size, ns: tuple[int, ...], flower: bool = True) -> tuple[list[Row], list[str]]:
    """All rows of one adapter size (the pool's safetensors files live in a temporary directory)."""
    llc = last_level_cache_bytes()
    size = pool_for(size, update_bytes(size.rank), llc, max(ns), memory_bytes(), 3 if flower else 2)
    with tempfile.TemporaryDirectory(prefix="fedbridge-bench-") as store:
        rows, notes = _run_size(size, ns, build_inputs(size, max(ns), Path(store), flower), flower)
    return rows, [f"{size.label}: a pool of {size.pool} distinct updates (at most N where half of memory holds them, "
                  f"at least twice the {llc >> 20} MiB last-level cache)", *notes]


@dataclass(frozen=True)
class CaseTimes:
    """Seconds and bandwidths of one (size, N) case; bandwidths in bytes/s."""

    case: str
    read_bytes: int  # N x update tensor bytes: what FedAvg must read
    files_1t: float
    files_2t: float  # nan: not measured at this N
    tensors_1t: float
    plain_1t: float
    flower: float | None
    memcpy_1t: float
    memcpy_2t: float
    mem_files: float
    mem_flower: float | None
    flat_goal: str
    flat: bool
    update_bytes: int
    pool: int  # distinct updates behind the N: below N, some are read more than once (cache-assisted)


def case_rows(c: CaseTimes) -> list[Row]:
    """The rows of one case. Only the physical reference (1 thread, from stored files) and memory carry goals."""
    def bw(seconds: float) -> float:
        return c.read_bytes / seconds

    distinct = c.pool >= c.read_bytes // c.update_bytes
    rows = [
        Row(f"{c.case}: FedAvg from stored files (mmap), 1 thread: bytes read/s over memcpy bandwidth"
            + ("" if distinct else f" (cache-assisted: only {c.pool} distinct updates, so some are read again from "
                                   "cache; information only)"),
            bw(c.files_1t) / 1e9, c.memcpy_1t / 1e9, bw(c.files_1t) / c.memcpy_1t, "GB/s",
            f">= {BANDWIDTH_GOAL:g}" if distinct else INFORMATIONAL,
            bw(c.files_1t) / c.memcpy_1t >= BANDWIDTH_GOAL if distinct else None),
    ]
    if not math.isnan(c.files_2t):
        rows.append(Row(f"{c.case}: FedAvg from stored files (mmap), {THREADS_2} threads: bytes read/s over "
                        f"{THREADS_2}-thread memcpy bandwidth", bw(c.files_2t) / 1e9, c.memcpy_2t / 1e9,
                        bw(c.files_2t) / c.memcpy_2t, "GB/s", INFORMATIONAL, None))
    rows += [
        Row(f"{c.case}: plain torch weighted sum (decoded tensors in memory), 1 thread: bytes read/s over memcpy "
            "bandwidth", bw(c.plain_1t) / 1e9, c.memcpy_1t / 1e9, bw(c.plain_1t) / c.memcpy_1t, "GB/s",
            INFORMATIONAL, None),
        Row(f"{c.case}: time, FedAvg from stored files vs plain torch weighted sum in memory (ratio: plain / ours)",
            c.files_1t, c.plain_1t, c.plain_1t / c.files_1t, "s", INFORMATIONAL, None),
    ]
    if c.flower is not None:
        rows.append(Row(f"{c.case}: time, FedAvg from stored files vs Flower 1.42 FedAvg from its Messages (ratio: "
                        "Flower / ours)", c.files_1t, c.flower, c.flower / c.files_1t, "s", INFORMATIONAL, None))
    ref_mem = c.mem_flower if c.mem_flower is not None else c.mem_files
    rows.append(Row(f"{c.case}: peak heap added by the call, FedAvg from stored files"
                    f"{' (reference: Flower)' if c.mem_flower is not None else ''}", c.mem_files, ref_mem,
                    ref_mem / c.mem_files if c.mem_files else math.inf, "MiB", c.flat_goal, c.flat))
    return rows


def _run_size(size: Size, ns: tuple[int, ...], inp: Inputs, with_flower: bool) -> tuple[list[Row], list[str]]:
    strategy = build_strategy("fedavg", {})
    threads = torch.get_num_threads()
    mib = inp.nbytes / 2**20
    print(f"[bench] {size.label}: {inp.params / 1e6:.1f}M params ({mib:.0f} MiB fp32), pool {size.pool}, "
          f"best of {size.repeats}", file=sys.stderr)

    def flower(n: int) -> Callable[[], Any]:
        from flwr.serverapp.strategy import FedAvg

        replies = flower_replies(inp, n)  # built outside the timed call, as Flower receives them
        return lambda: FedAvg().aggregate_train(1, replies)[0]

    # Each side's calls move along the pool (see the module docstring); each side's first call starts at entry 0,
    # so the outputs compared below are of the same updates.
    def ours_files(n: int) -> Callable[[], Any]:
        at = Rotation()
        return lambda: strategy.aggregate(inp.global_state, ours_from_files(inp, n, at.take(n)))

    def ours_tensors(n: int) -> Callable[[], Any]:
        at = Rotation()
        return lambda: strategy.aggregate(inp.global_state, ours_from_tensors(inp, n, at.take(n)))

    def plain(n: int) -> Callable[[], Any]:
        at = Rotation()

        def call() -> StateDict:
            start = at.take(n)
            deltas = [inp.deltas[(start + i) % len(inp.deltas)] for i in range(n)]
            return plain_weighted_sum(inp.global_state, deltas, inp.weights[:n])
        return call

    def timed(fn: Callable[[], Any], nthreads: int) -> float:
        torch.set_num_threads(nthreads)
        try:
            fn()  # warm-up at this thread count
            return best_time(size.repeats, fn)
        finally:
            torch.set_num_threads(1)

    rows: list[Row] = []
    notes: list[str] = []
    ours_mem_first: float | None = None
    flat_goal = f"ours flat in N (<= {FLAT_SLACK:g} x N={ns[0]} + {FLAT_ABS_MIB:g} MiB)"
    torch.set_num_threads(1)  # the goal is on 1 thread; numpy's arithmetic in Flower is single-threaded too
    try:
        for n in ns:
            # Memory first: one untimed call per side, which also maps the heap the timed calls then reuse.
            of_fn, ot_fn, pl_fn = ours_files(n), ours_tensors(n), plain(n)
            of_mem, of_out = peak_memory(of_fn)
            pl_out = pl_fn()
            diff_plain = max(float((of_out.state[k] - pl_out[k]).abs().max()) for k in pl_out)
            del pl_out
            fl_mem = fl_s = None
            diff = math.nan
            if with_flower:
                fl_fn = flower(n)
                fl_mem, fl_out = peak_memory(fl_fn)
                diff = max_abs_diff(of_out.state, fl_out)
                del fl_out
                fl_s = best_time(size.repeats, fl_fn)
                del fl_fn
            del of_out
            ot_mem, _ = peak_memory(ot_fn)
            # The copy bandwidth right before the timings it is the reference of, under the same load.
            bw1 = memcpy_bandwidth(1)
            of_s = timed(of_fn, 1)
            ot_s = timed(ot_fn, 1)
            pl_s = timed(pl_fn, 1)
            # 2 threads at the smallest N only: on a shared 2-core machine torch's 2-thread kernels wait on each
            # other, which at large N takes minutes and says nothing the smallest N does not.
            bw2, of2_s = (memcpy_bandwidth(THREADS_2), timed(of_fn, THREADS_2)) if n == ns[0] else (math.nan, math.nan)
            if ours_mem_first is None:
                ours_mem_first = of_mem
            case = f"fedavg {size.label} N={n}"
            c = CaseTimes(case, n * inp.nbytes, of_s, of2_s, ot_s, pl_s, fl_s, bw1, bw2, of_mem, fl_mem, flat_goal,
                          of_mem <= FLAT_SLACK * ours_mem_first + FLAT_ABS_MIB, inp.nbytes, size.pool)
            rows += case_rows(c)
            notes.append(f"{case}: {n} x {mib:.0f} MiB read; from decoded tensors (list) {ot_s:.3f} s, "
                         f"{c.read_bytes / ot_s / bw1:.2f} x memcpy; max |ours - plain torch| = {diff_plain:.2e}, "
                         f"max |ours - Flower| = {diff:.2e}; ours from tensors adds {ot_mem:.0f} MiB of heap"
                         + (f"; Flower needs its {n} replies resident before the call ({n * mib / 1024:.2f} GiB if "
                            "distinct), ours maps the stored files (page cache, file-backed)" if with_flower else ""))
            print(f"[bench] {case}: files {of_s:.3f}s ({c.read_bytes / of_s / bw1:.2f} x memcpy {bw1 / 1e9:.1f} GB/s), "
                  f"{THREADS_2} threads {of2_s:.3f}s, tensors {ot_s:.3f}s, plain {pl_s:.3f}s, Flower {fl_s}s; "
                  f"heap {of_mem:.0f} / {ot_mem:.0f} / {fl_mem} MiB", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    return rows, notes


def run(sizes: tuple[Size, ...], ns: tuple[int, ...], flower: bool = True) -> tuple[list[Row], list[str]]:
    """Every size, then the environment notes."""
    if flower:
        from flwr.supercore.task_identity import TaskIdentity

        logging.getLogger("flwr").setLevel(logging.WARNING)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    retained = retain_heap()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    notes: list[str] = []
    for size in sizes:
        size_rows, size_notes = run_size(size, ns, flower)
        rows += size_rows
        notes += size_notes
        gc.collect()
    notes.append(f"heap retention (mallopt) {'on' if retained else 'OFF'}; "
                 f"torch threads: {torch.get_num_threads()}; CPU cores: {os.cpu_count()}; torch {torch.__version__}; "
                 f"1-min load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} (a shared machine: "
                 f"every side ran interleaved under the same load, and memcpy was measured right before each case)")
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small case (8M, N=10) as a smoke test")
    parser.add_argument("--no-flower", action="store_true", help="skip the (informational) Flower rows")
    args = parser.parse_args(argv)
    sizes = (Size("8M", 8, 4, 1),) if args.quick else SIZES
    ns = (10,) if args.quick else NS
    t0 = time.perf_counter()
    rows, notes = run(sizes, ns, flower=not args.no_flower)
    notes = [
        "Physical reference: bytes FedAvg must read (N x the update's tensor bytes) / its time, over this machine's "
        f"memcpy bandwidth (glibc memcpy, bytes copied/s, {MEMCPY_BYTES >> 20} MiB buffers, best of {MEMCPY_REPEATS}) "
        "measured in the same run right before each case. FedAvg is strategies' fedavg through build_strategy, reading the "
        "stored safetensors files memory-mapped as the coordinator's round step does. Time: best of R after an "
        "untimed call, heap retained (see the module docstring). Memory: peak heap bytes in use (glibc mallinfo2, "
        "sampled every 0.5 ms) added by the untimed call.",
        "Inputs: every side cycles through the same pool of distinct updates (each size's pool is noted below), and "
        "each timed call of ours and plain torch starts N updates on from the last, so no call reads what the one "
        "before left in cache; 100 distinct 64M updates would need 25 GiB, more than the 24 GiB here. Ours sums "
        "float32 updates in float32, in site-name order, so the result does not depend on arrival order.",
        *notes, f"wall time {time.perf_counter() - t0:.0f} s"]
    write_results("aggregate", rows, notes)


if __name__ == "__main__":
    main()
