"""Compressed update encodings: wire bytes against float32 and bfloat16, and the held-out loss they cost.

Each encoding is one :class:`Method` in :data:`METHODS` (a new row is one more entry): ``fp32`` (the reference),
``bf16`` ([lora] wire_dtype), ``int8``, ``int4``, ``nf4`` and ``topk1%+int8`` ([lora] compression, block size
128, error feedback at the sites).

Bytes (no training): the real safetensors payload of one update of a realistic adapter (Qwen2.5-0.5B's shapes, r=16,
all-linear, Gaussian values), encoded by the site's own :class:`site_agent.egress.filters.CompressFilter`, and a
Llama-3-8B r=16 all-linear estimate computed from the shapes alone (tensor bytes of
:func:`protos.codec.encoded_layout`; headers excluded). Goals (issue #17): int8 <= 0.26x fp32, int4 <= 0.14x,
top-k 1% + int8 <= 0.02x.

Loss: FedAvg under :mod:`bench.quality`'s protocol (its config, tasks, evaluation and non-IID data: 3 sites, the same
seeds for every encoding), each site encoding its delta with error feedback, the coordinator decoding the payload
bytes (:func:`fedcommon.compress.decode_update`) before aggregating. The cost is the final union held-out loss over
the uncompressed run's, mean over ``--seeds`` (at least 3). Goals: int8 <= +0.5%, int4 <= +1%; nf4 and top-k are
informational.

    .venv/bin/python -m bench.compress                    # 3 sites, 4 rounds x 5 steps, seeds 0,1,2 (minutes)
    .venv/bin/python -m bench.compress --bytes-only       # the byte rows alone (seconds)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.quality import QualityConfig, _evaluate, _task, quiet
from bench.report import Row, write_results

BLOCK = 128


@dataclass(frozen=True)
class Method:
    """One row group: how an update travels, and what it must achieve.

    Attributes:
        name: The row's case name.
        encoding: ``[lora] compression`` (``none``: dense in ``wire_dtype``).
        wire_dtype: ``F32`` or ``BF16`` (the dense dtype; the decoded dtype under compression).
        topk_fraction: ``[lora] topk_fraction``.
        bytes_goal: Largest allowed wire bytes over fp32 (None: informational).
        loss_goal: Largest allowed final loss over uncompressed, e.g. 1.005 (None: informational).
        train: Whether the loss is measured (the dense dtypes' loss is the reference's).
    """

    name: str
    encoding: str = "none"
    wire_dtype: str = "F32"
    topk_fraction: float = 0.0
    bytes_goal: float | None = None
    loss_goal: float | None = None
    train: bool = True

    def compression(self) -> Any:
        from fedcommon import compress

        return None if self.encoding == "none" else compress.compression(self.encoding, BLOCK, self.topk_fraction)


METHODS: tuple[Method, ...] = (
    Method("fp32"),
    Method("bf16", wire_dtype="BF16", train=False),
    Method("int8", "int8", bytes_goal=0.26, loss_goal=1.005),
    Method("int4", "int4", bytes_goal=0.14, loss_goal=1.01),
    Method("nf4", "nf4"),
    Method("topk1%+int8", "int8", topk_fraction=0.01, bytes_goal=0.02),
)
REFERENCE = "fp32"


def qwen05_shapes(rank: int = 16) -> dict[str, tuple[int, int]]:
    """LoRA A/B shapes of Qwen2.5-0.5B (hidden 896, intermediate 4864, 24 layers, KV dim 128), all-linear."""
    return _llama_like(896, 4864, 24, 128, rank)


def llama8b_shapes(rank: int = 16) -> dict[str, tuple[int, int]]:
    """LoRA A/B shapes of Llama-3-8B (hidden 4096, intermediate 14336, 32 layers, KV dim 1024), all-linear."""
    return _llama_like(4096, 14336, 32, 1024, rank)


def _llama_like(hidden: int, inter: int, layers: int, kv: int, r: int) -> dict[str, tuple[int, int]]:
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    out = {}
    for i in range(layers):
        for m, (fan_in, fan_out) in dims.items():
            p = f"base_model.model.model.layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}"
            out[f"{p}.lora_A.weight"] = (r, fan_in)
            out[f"{p}.lora_B.weight"] = (fan_out, r)
    return out


def _spec(shapes: dict[str, tuple[int, int]], m: Method) -> Any:
    from protos import codec
    from protos.fedbridge.v1 import federation_service_pb2 as pb

    ts = [pb.TensorSpec(name=k, shape=list(s), dtype=m.wire_dtype) for k, s in shapes.items()]
    return codec.adapter_spec(ts, 16, 32.0, 0.0, ["all-linear"], m.compression())


def estimated_bytes(shapes: dict[str, tuple[int, int]], m: Method) -> int:
    """Tensor bytes of one update (safetensors header excluded), from the shapes alone."""
    from protos import codec

    size = {"F32": 4, "BF16": 2, "I8": 1, "U8": 1, "I32": 4}
    spec = _spec(shapes, m)
    if m.encoding == "none":
        return sum(math.prod(s) * size[m.wire_dtype] for s in shapes.values())
    return sum(math.prod(s) * size[d] for s, d in codec.encoded_layout(spec).values())


def payload_bytes(shapes: dict[str, tuple[int, int]], m: Method, seed: int = 0) -> int:
    """Bytes of the real safetensors payload of one Gaussian update, encoded by the site's own egress filter."""
    import torch

    from fedcommon import tensors
    from site_agent.egress.filters import CastFilter, CompressFilter

    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
    last = CastFilter(m.wire_dtype) if m.encoding == "none" else CompressFilter(_spec(shapes, m))
    return len(tensors.encode_state(last.apply(delta)))


def run_fedavg(m: Method, cfg: QualityConfig, base_dir: Path, sites: list[Any], work_dir: Path) -> float:
    """FedAvg over ``cfg.rounds``, every update encoded as ``m`` with error feedback; the final union held-out loss."""
    import torch

    from coordinator.config import LoraSpec
    from coordinator.rounds.adapter import init_adapter
    from fedcommon import compress, tensors
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.egress.filters import CastFilter, CompressFilter
    from site_agent.training.data import load_sft
    from site_agent.training.trainer import SftSiteTrainer
    from strategies.registry import build_strategy
    from strategies.types import ClientUpdate

    torch.set_num_threads(1)
    union = [row for s in sites for row in load_sft(s.heldout_path)]
    lora = LoraSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=("all-linear",), seed=cfg.seed,
                    compression=m.encoding, compression_block_size=BLOCK, topk_fraction=m.topk_fraction)
    init = init_adapter(base_dir, lora)
    spec = init.spec
    strategy = build_strategy("fedavg")
    trainers = [SftSiteTrainer(base_dir, load_sft(s.train_path), work_dir / s.name) for s in sites]
    evaluator = SftSiteTrainer(base_dir, [], work_dir / "eval")
    residuals: dict[str, dict[str, torch.Tensor] | None] = {s.name: None for s in sites}
    state = init.state
    for round_ in range(1, cfg.rounds + 1):
        task = _task(cfg, spec, round_, cfg.steps, pb.SiteHints(), cfg.lr("fedavg"))
        updates = []
        for site, trainer in zip(sites, trainers, strict=True):
            res = trainer.train_round(task, state)
            if m.encoding == "none":
                payload = tensors.encode_state(CastFilter("F32").apply(res.delta))
            else:
                f = CompressFilter(spec, residuals[site.name])
                encoded = f.apply(res.delta)
                residuals[site.name] = f.residual(res.delta, encoded)
                payload = tensors.encode_state(encoded)
            updates.append(ClientUpdate(site.name, compress.decode_update(payload, spec), res.num_examples))
        state = strategy.aggregate(state, updates).state
    loss = _evaluate(evaluator, spec, state, union, cfg.max_length)
    print(f"[compress] {m.name} seed {cfg.seed}: held-out {loss:.4f}", file=sys.stderr, flush=True)
    return loss


def measure_losses(cfg: QualityConfig, seeds: list[int], work: Path) -> dict[str, list[float]]:
    """Final held-out loss of every trained method, per seed (the same data and seeds for every method)."""
    from sandbox.synthetic import make_site_datasets
    from sandbox.tiny_model import build_tiny_model

    base = build_tiny_model()
    jobs = {}
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"), initializer=quiet) as pool:
        for seed in seeds:
            c = replace(cfg, seed=seed)
            sites = make_site_datasets(work / f"data-{seed}", n_sites=c.sites, seed=seed, n_train=c.n_train,
                                       n_heldout=c.n_heldout)
            for m in METHODS:
                if m.train:
                    jobs[(m.name, seed)] = pool.submit(run_fedavg, m, c, base, sites, work / f"{m.name}-{seed}")
        out: dict[str, list[float]] = {}
        for (name, _), fut in jobs.items():
            out.setdefault(name, []).append(fut.result())
    return out


def build_rows(losses: dict[str, list[float]] | None) -> list[Row]:
    rows = []
    real, big = qwen05_shapes(), llama8b_shapes()
    ref = {m.name: m for m in METHODS}
    fp32_real, bf16_real = payload_bytes(real, ref["fp32"]), payload_bytes(real, ref["bf16"])
    fp32_big, bf16_big = estimated_bytes(big, ref["fp32"]), estimated_bytes(big, ref["bf16"])
    for m in METHODS:
        ours, est = payload_bytes(real, m), estimated_bytes(big, m)
        goal = "informational" if m.bytes_goal is None else f"<= {m.bytes_goal}x fp32"
        for case, value, fp32, bf16 in ((f"{m.name} bytes, Qwen2.5-0.5B r16 payload", ours, fp32_real, bf16_real),
                                        (f"{m.name} bytes, Llama-3-8B r16 estimate", est, fp32_big, bf16_big)):
            if m.name != REFERENCE:
                rows.append(Row(f"{case} vs fp32", value, fp32, value / fp32, "bytes", goal,
                                None if m.bytes_goal is None else value / fp32 <= m.bytes_goal))
            if m.name != "bf16":
                rows.append(Row(f"{case} vs bf16", value, bf16, value / bf16, "bytes", "informational", None))
    # Fed-SB sends one r x r matrix R per module whatever the layer widths (bench/fedsb.py measures it end to end).
    for r in (16, 64):
        modules = sum(1 for k in big if k.endswith(".lora_A.weight"))
        sb = modules * r * r * 4
        rows.append(Row(f"fed_sb r={r} (R matrices, F32) bytes, Llama-3-8B estimate vs fp32 LoRA r16", sb, fp32_big,
                        sb / fp32_big, "bytes", "informational", None))
    if losses:
        base = statistics.fmean(losses[REFERENCE])
        for m in METHODS:
            if not m.train or m.name == REFERENCE:
                continue
            ours = statistics.fmean(losses[m.name])
            goal = "informational" if m.loss_goal is None else f"<= {m.loss_goal}x uncompressed"
            rows.append(Row(f"{m.name} final held-out loss (mean of {len(losses[m.name])} seeds)", ours, base,
                            ours / base, "loss", goal, None if m.loss_goal is None else ours / base <= m.loss_goal))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="data/training seeds (at least 3 for the goal rows)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bytes-only", action="store_true", help="skip the training (byte rows only)")
    ap.add_argument("--no-fedsb", action="store_true", help="skip the Fed-SB vs FedEx-LoRA rows (bench.fedsb)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.bytes_only and len(seeds) < 3:
        ap.error("--seeds: the quality protocol needs at least 3 seeds")
    quiet()
    start = time.perf_counter()
    cfg = QualityConfig(sites=3, rounds=args.rounds, steps=args.steps, workers=args.workers)
    losses = None
    if not args.bytes_only:
        with tempfile.TemporaryDirectory(prefix="fedbridge-compress-") as tmp:
            losses = measure_losses(cfg, seeds, Path(tmp))
    rows = build_rows(losses)
    wall = time.perf_counter() - start
    notes = [f"block size {BLOCK} (one float32 absmax per block); top-k keeps ceil(1% of n) per tensor, I32 indices; "
             "bytes of the real payload include its safetensors header, the 8B estimate does not",
             f"loss: FedAvg, {cfg.sites} non-IID sites, {cfg.rounds} rounds x {cfg.steps} steps, lr "
             f"{cfg.lr('fedavg'):g}, rank {cfg.rank}, seeds {seeds}, error feedback at every site",
             f"took {wall:.0f} s on {args.workers} worker(s)"]
    if losses:
        notes.append("per-seed final losses: " + "; ".join(f"{k}: {', '.join(f'{v:.4f}' for v in vs)}"
                                                           for k, vs in losses.items()))
    if not args.bytes_only and not args.no_fedsb:
        from bench.fedsb import FedSBBench, fedsb_rows

        sb_rows, sb_notes = fedsb_rows(FedSBBench(rounds=args.rounds, steps=args.steps), tuple(seeds))
        rows += sb_rows
        notes += [f"fed_sb: {n}" for n in sb_notes]
    write_results("compress", rows, notes)


if __name__ == "__main__":
    main()
