"""GPU check of the site trainer (issue 4, item 3): QLoRA on CUDA and DeepSpeed ZeRO-2 across the visible GPUs.

Run it on a machine with CUDA, bitsandbytes and deepspeed (the ``site`` extra)::

    .venv/bin/python -m bench.gpu_check

Without CUDA it prints why it skipped and exits 0. With CUDA it trains the tiny model through ``SftSiteTrainer``
(the code path a site runs) and writes ``bench/results/gpu_check.json``:

* ``sft``: plain LoRA on one GPU, fp32: the reference row.
* ``qlora``: 4-bit nf4 base with double quantization, bf16 compute, float32 LoRA (the delta's dtype) on one GPU.
* ``zero2``: ZeRO-2 through accelerate/DeepSpeed, one process per visible GPU under ``torchrun``; tokens/s summed
  over ranks.
* ZeRO-3: the site trainer refuses it (partitioned parameters would need gathering to read the adapter delta);
  the check records the refusal message instead of a number.

Every case also checks that its delta matches the adapter spec (keys, shapes, float32, finite).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

STEPS, BATCH, MAX_LENGTH = 30, 8, 128
ZERO2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": False},
         "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto", "weight_decay": "auto"}},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}


def train_case(mode: str, deepspeed: dict[str, Any] | None, work: Path) -> dict[str, float]:
    """One round of ``mode`` through the site trainer; returns tokens and training seconds (this process)."""
    from coordinator.config import LoraSpec
    from coordinator.rounds.adapter import init_adapter
    from fedcommon import tensors
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from sandbox.synthetic import make_site_datasets
    from sandbox.tiny_model import build_tiny_model
    from site_agent.training.data import load_sft
    from site_agent.training.trainer import SftSiteTrainer

    base = build_tiny_model(cache_dir=work / "cache")  # built by main() before any torchrun worker starts
    rank = os.environ.get("RANK", "0")  # torchrun workers share ``work``: each writes its own data and scratch
    rows = load_sft(make_site_datasets(work / f"data-{mode}-{rank}", n_sites=1, n_train=128, n_heldout=4)[0].train_path)
    init = init_adapter(base, LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    task = pb.Task(round=1, adapter_spec=init.spec, training=pb.TrainingConfig(
        mode=mode, max_steps=STEPS, learning_rate=2e-4, per_device_batch_size=BATCH, max_length=MAX_LENGTH, seed=0))
    trainer = SftSiteTrainer(base, rows, work / f"work-{mode}-{rank}",
                             quantize=mode == "qlora", deepspeed=deepspeed)
    trainer.train_round(task, init.state)  # warm-up: CUDA kernels, tokenisation
    result = trainer.train_round(task, init.state)
    tensors.check_against_spec(result.delta, init.spec)
    return {"tokens": float(result.tokens), "seconds": result.train_time_s}


def _zero2_under_torchrun(work: Path, gpus: int) -> float:
    """ZeRO-2 on every visible GPU, one torchrun worker each; returns summed tokens/s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "bench.gpu_check", "--zero2-worker", str(work)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob("zero2-rank-*.json"))]
    if len(ranks) != gpus:
        raise RuntimeError(f"expected {gpus} ZeRO-2 rank results, got {len(ranks)}")
    return sum(r["tokens"] / r["seconds"] for r in ranks)


def _zero3_status() -> str:
    """The site trainer's answer to a ZeRO-3 config: its refusal message, or "accepted"."""
    from site_agent.training.trainer import check_deepspeed

    try:
        check_deepspeed({"zero_optimization": {"stage": 3}})
    except ValueError as e:
        return f"refused by the site trainer: {e}"
    return "accepted by the site trainer but not exercised by this check"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: SKIPPED: torch.cuda.is_available() is false (no CUDA GPU); nothing was run.")
        return 0
    from bench.report import Row, write_results

    gpus = torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="fedbridge-gpu-check-"))
    try:
        sft = train_case("sft", None, work)
        ref = sft["tokens"] / sft["seconds"]
        qlora = train_case("qlora", None, work)
        q_tps = qlora["tokens"] / qlora["seconds"]
        z2_tps = _zero2_under_torchrun(work, gpus)
        zero3 = _zero3_status()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        Row("sft LoRA fp32, 1 GPU", ref, ref, 1.0, "tokens/s", "runs on CUDA", ref > 0),
        Row("qlora nf4 + double quant, bf16 compute, 1 GPU", q_tps, ref, q_tps / ref, "tokens/s", "runs on CUDA",
            q_tps > 0),
        Row(f"DeepSpeed ZeRO-2, {gpus} GPU(s) (summed over ranks)", z2_tps, ref, z2_tps / ref, "tokens/s",
            "runs on CUDA", z2_tps > 0),
    ]
    write_results("gpu_check", rows, notes=[
        f"{torch.cuda.get_device_name(0)} x{gpus}; {STEPS} steps, batch {BATCH}, max_length {MAX_LENGTH}, "
        "tiny model, LoRA r8 on q,k,v,o; best is not taken: one timed round after one warm-up round per case.",
        f"ZeRO-3: {zero3}",
    ])
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--zero2-worker":
        result = train_case("sft", ZERO2, Path(sys.argv[2]))
        Path(sys.argv[2], f"zero2-rank-{os.environ['RANK']}.json").write_text(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
