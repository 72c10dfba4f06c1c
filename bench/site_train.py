"""Site trainer throughput: ``SftSiteTrainer.train_round`` tokens/s vs a plain TRL ``SFTTrainer`` on the same inputs.

Both train the same tiny model with the same LoRA adapter, the same synthetic chat rows, steps, batch size, length
limit, learning rate and seed, with the same TRL arguments (assistant-only loss, no gradient checkpointing, CPU,
fp32). Both count the same tokens (the rows seen are the same), so tokens/s differ only by training time. The
reference builds its trainer once and calls ``train()``; ours runs whole rounds (load the global adapter, set up
the trainer, train, compute the delta), and its training loop time is what ``tokens/s`` uses. A second row compares
the whole round with the reference's construct-plus-train. Each side runs REPEATS times, interleaved, after a
warm-up, alternating which side goes first, on one torch thread; the best time counts (the least disturbed by
other processes sharing the cores).
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch

from bench.report import Row, write_results
from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from fedcommon.models import lora_config
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.synthetic import make_site_datasets
from sandbox.tiny_model import build_tiny_model
from site_agent.training.data import load_sft
from site_agent.training.trainer import SftSiteTrainer

STEPS = 60
BATCH = 4
MAX_LENGTH = 128
LR = 2e-3
REPEATS = 7


def _reference(base: Path, rows: list[dict], spec: pb.AdapterSpec, state: dict[str, torch.Tensor],
               out: Path) -> tuple[float, float]:
    """Plain TRL: load, wrap with PEFT, SFTTrainer.train(). Returns (train seconds, construct + train seconds)."""
    from datasets import Dataset
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora_config(spec))
    set_peft_model_state_dict(model, state)
    start = time.perf_counter()
    args = SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                     lr_scheduler_type="constant", max_length=MAX_LENGTH, seed=1, data_seed=1,
                     assistant_only_loss=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                     save_strategy="no", report_to=[], logging_steps=max(1, STEPS // 4), disable_tqdm=True,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))
    t0 = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    return end - t0, end - start


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one core each way: the two-core CI box is shared, and 1 thread is the least noisy
    base = build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="fedbridge-site-train-") as tmp:
        site = make_site_datasets(Path(tmp) / "data", n_sites=1, n_train=64, n_heldout=4)[0]
        rows = load_sft(site.train_path)
        init = init_adapter(base, LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj")))
        task = pb.Task(round=1, adapter_spec=init.spec, training=pb.TrainingConfig(
            mode="sft", max_steps=STEPS, learning_rate=LR, per_device_batch_size=BATCH, max_length=MAX_LENGTH,
            seed=0, lr_scheduler_type="constant"))
        ours = SftSiteTrainer(base, rows, Path(tmp) / "work")
        ours.train_round(task, init.state)  # warm-up: tokenises once, as a long-lived agent does
        _reference(base, rows, init.spec, init.state, Path(tmp) / "ref")  # warm-up
        ours_train, ours_round, ref_train, ref_total, tokens = [], [], [], [], 0
        for i in range(2 * REPEATS):  # interleaved, alternating which side goes first
            gc.collect()  # neither side pays for the other's garbage
            if (i % 2 == 0) == (i // 2 % 2 == 0):
                result = ours.train_round(task, init.state)
                ours_train.append(result.train_time_s)
                ours_round.append(result.round_time_s)
                tokens = result.tokens
            else:
                train_s, total_s = _reference(base, rows, init.spec, init.state, Path(tmp) / "ref")
                ref_train.append(train_s)
                ref_total.append(total_s)

    ours_tps, ref_tps = tokens / min(ours_train), tokens / min(ref_train)
    ratio = ours_tps / ref_tps
    round_ratio = min(ref_total) / min(ours_round)
    rows_out = [
        Row(f"training loop tokens/s ({STEPS} steps, batch {BATCH}, LoRA r8 q,v)", ours_tps, ref_tps, ratio,
            "tokens/s", ">= 0.95", ratio >= 0.95),
        Row("whole round vs construct + train (speed ratio: reference s / ours s)", min(ours_round),
            min(ref_total), round_ratio, "s", ">= 0.95", round_ratio >= 0.95),
    ]
    write_results("site_train", rows_out, notes=[
        f"{tokens} tokens per run on both sides; best of {REPEATS} interleaved runs after one warm-up each.",
        "ours: SftSiteTrainer.train_round (global adapter load, trainer set-up, FedProx-capable SFTTrainer "
        "subclass, delta); reference: plain trl.SFTTrainer with the same arguments.",
    ])


if __name__ == "__main__":
    main()
