"""GPU check of the site trainer (issue 4, item 3): QLoRA on CUDA and DeepSpeed ZeRO-2 across the visible GPUs.

Run it on a machine with CUDA, bitsandbytes and deepspeed (the ``site`` extra)::

    .venv/bin/python -m bench.gpu_check

Without CUDA it prints why it skipped and exits 0. With CUDA it trains the tiny model through ``SftSiteTrainer``
(the code path a site runs) and writes ``bench/results/gpu_check.json``:

* ``sft``: LoRA on one GPU, bf16 autocast where the GPU has bf16 (fp16 otherwise), float32 LoRA weights.
* ``qlora``: 4-bit nf4 base with double quantization, bf16 compute, float32 LoRA (the delta's dtype) on one GPU.
* goal rows: LoRA (bf16) and QLoRA (bf16 compute) through ``SftSiteTrainer`` against plain TRL ``SFTTrainer`` on
  the same model, tokenised rows, steps, batch and precision: tokens/s ratio >= 0.95 and peak GPU memory
  (``torch.cuda.max_memory_allocated``) ratio <= 1.05. Both sides see the same examples, so they count the same
  tokens and tokens/s differs only by training time.
* ``zero2``: ZeRO-2 through accelerate/DeepSpeed, one process per visible GPU under ``torchrun``; tokens/s summed
  over ranks.
* The plain throughput rows (sft, qlora, zero2 in tokens/s) are information only: goal "informational",
  ``meets_goal`` null. That a case runs at all is checked by the case itself (it raises otherwise).
* ZeRO-3: the site trainer accepts it (gathering the LoRA tensors to read the delta, rebuilding the model each
  round; tested on CPU by ``tests/site_agent/test_deepspeed.py`` and ``test_launchers.py``); this check records
  the trainer's answer, not a number.

Every case also checks that its delta matches the adapter spec (keys, shapes, float32, finite).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

STEPS, BATCH, MAX_LENGTH = 30, 8, 128
ZERO2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto"},
         "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto", "weight_decay": "auto"}},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}


def train_case(mode: str, deepspeed: dict[str, Any] | None, work: Path) -> dict[str, float]:
    """One round of ``mode`` through the site trainer; returns tokens, training seconds and peak GPU bytes of the
    timed round (this process)."""
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
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train_round(task, init.state)
    torch.cuda.synchronize()
    peak = float(torch.cuda.max_memory_allocated())
    tensors.check_against_spec(result.delta, init.spec)  # float32 spec: the delta leaves the trainer in float32
    del trainer
    _free_cuda()
    return {"tokens": float(result.tokens), "seconds": result.train_time_s, "peak_bytes": peak}


def _free_cuda() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def reference_case(mode: str, work: Path) -> dict[str, float]:
    """Plain TRL ``SFTTrainer`` on the same base, LoRA config, tokenised rows, steps and precision as
    :func:`train_case` (``qlora``: the same 4-bit config); returns seconds of the timed ``train()`` and peak bytes."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from fedcommon.models import device_precision, lora_config_for, trainer_precision_args
    from sandbox.synthetic import make_site_datasets
    from sandbox.tiny_model import build_tiny_model
    from site_agent.training.data import load_sft
    from site_agent.training.trainer import masked_dataset

    base = build_tiny_model(cache_dir=work / "cache")
    rows = load_sft(make_site_datasets(work / f"data-ref-{mode}", n_sites=1, n_train=128, n_heldout=4)[0].train_path)
    tok = AutoTokenizer.from_pretrained(base)
    cuda, bf16 = device_precision()
    if mode == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
                                   bnb_4bit_quant_storage=torch.uint8)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map="auto",
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, lora_config_for(8, 16.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    dataset = masked_dataset(tok, rows)
    seconds = []
    for i in range(2):  # a warm-up round, then the timed one, as train_case does
        args = SFTConfig(output_dir=str(work / f"ref-{mode}-{i}"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                         learning_rate=2e-4, lr_scheduler_type="constant", max_length=MAX_LENGTH, seed=1, data_seed=1,
                         assistant_only_loss=False, **trainer_precision_args(cuda, bf16), gradient_checkpointing=False,
                         save_strategy="no", report_to=[], logging_steps=max(1, STEPS // 4), disable_tqdm=True,
                         dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=dataset)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        del trainer
    peak = float(torch.cuda.max_memory_allocated())
    del model
    _free_cuda()
    return {"seconds": seconds[-1], "peak_bytes": peak}


def goal_rows(mode: str, label: str, ours: dict[str, float], ref: dict[str, float]) -> list[Any]:
    """The two goal rows of one mode: tokens/s (ours / TRL >= 0.95) and peak GPU memory (ours / TRL <= 1.05)."""
    from bench.report import Row

    ours_tps, ref_tps = ours["tokens"] / ours["seconds"], ours["tokens"] / ref["seconds"]  # same examples seen
    t_ratio, m_ratio = ours_tps / ref_tps, ours["peak_bytes"] / ref["peak_bytes"]
    return [
        Row(f"{label}: tokens/s vs plain TRL SFTTrainer", ours_tps, ref_tps, t_ratio, "tokens/s", "ratio >= 0.95",
            t_ratio >= 0.95),
        Row(f"{label}: peak GPU memory vs plain TRL SFTTrainer", ours["peak_bytes"] / 2**20, ref["peak_bytes"] / 2**20,
            m_ratio, "MiB", "ratio <= 1.05", m_ratio <= 1.05),
    ]


def info_rows(precision: str, gpus: int, sft_tps: float, qlora_tps: float, zero2_tps: float) -> list[Any]:
    """Throughput rows that are information only (no goal: a case that failed to run raised before this)."""
    from bench.report import INFORMATIONAL, Row

    return [
        Row(f"sft LoRA {precision} autocast, 1 GPU", sft_tps, sft_tps, 1.0, "tokens/s", INFORMATIONAL, None),
        Row(f"qlora nf4 + double quant, {precision} compute, 1 GPU (reference: sft)", qlora_tps, sft_tps,
            qlora_tps / sft_tps, "tokens/s", INFORMATIONAL, None),
        Row(f"DeepSpeed ZeRO-2, {gpus} GPU(s) (summed over ranks; reference: sft)", zero2_tps, sft_tps,
            zero2_tps / sft_tps, "tokens/s", INFORMATIONAL, None),
    ]


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
    from bench.report import write_results

    gpus = torch.cuda.device_count()
    work = Path(tempfile.mkdtemp(prefix="fedbridge-gpu-check-"))
    try:
        sft = train_case("sft", None, work)
        ref = sft["tokens"] / sft["seconds"]
        sft_ref = reference_case("sft", work)
        qlora = train_case("qlora", None, work)
        q_tps = qlora["tokens"] / qlora["seconds"]
        qlora_ref = reference_case("qlora", work)
        z2_tps = _zero2_under_torchrun(work, gpus)
        zero3 = _zero3_status()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from fedcommon.models import device_precision, training_precision

    precision = training_precision(*device_precision())
    rows = [
        *goal_rows("sft", f"LoRA {precision} autocast, 1 GPU", sft, sft_ref),
        *goal_rows("qlora", f"QLoRA nf4, {precision} compute, 1 GPU", qlora, qlora_ref),
        *info_rows(precision, gpus, ref, q_tps, z2_tps),
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
