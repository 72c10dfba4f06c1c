"""Preference training at a site (DPO, KTO, ORPO, SimPO) with TRL on the site's LoRA adapter.

Argument names follow ms-swift/TRL (``beta``, ``loss_type``, ``rpo_alpha``, ``simpo_gamma``, ``cpo_alpha``,
``desirable_weight``, ``undesirable_weight``, ``label_smoothing``); a zero or empty task field keeps TRL's default.

The reference model of DPO and KTO is the round's **global model** (base + global adapter), not the bare base.
With a ``PeftModel`` whose ``default`` adapter already holds the global weights, TRL 1.16's DPOTrainer and
KTOTrainer add a frozen adapter named ``ref``, copy the ``default`` weights into it at construction, and compute
the reference log-probs under ``use_adapter(model, "ref")``. This trainer therefore loads the global adapter into
``default`` *before* it builds the TRL trainer, and drops ``ref`` again after the round so the next round copies
the next global adapter. ORPO and SimPO have no reference model. Only ``default`` is ever read for the delta.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedcommon.models import device_precision, trainer_precision_args
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.training.trainer import (
    RoundResult,
    SftSiteTrainer,
    _as_dataset,
    _Progress,
    _scheduler,
    checkpoint_args,
    data_weight,
    float32_delta,
    keep_adapter_dtype,
    proximal_trainer_cls,
)

PREFERENCE_MODES = ("dpo", "kto", "orpo", "simpo")
REF_ADAPTER = "ref"  # the name TRL 1.16 gives the frozen reference copy of the "default" adapter


def _config(mode: str, t: pb.TrainingConfig, seed: int, checkpointing: dict[str, Any]) -> Any:
    """Build the TRL config of ``mode`` from the task's training config, with CPU-safe defaults.

    TRL 1.16 configs default to ``bf16=True``, which fails (or crawls) on CPU; the precision flags come from the
    device (:func:`fedcommon.models.trainer_precision_args`: bf16/fp16 autocast on CUDA, fp32 on CPU).
    """
    common: dict[str, Any] = dict(
        **checkpointing, max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=max(1, t.gradient_accumulation_steps), learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, lr_scheduler_type=_scheduler(t),
        max_length=t.max_length, seed=seed, data_seed=seed, **trainer_precision_args(*device_precision()), report_to=[],
        logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0)
    if t.beta:
        common["beta"] = t.beta
    if mode == "dpo":
        from trl import DPOConfig

        extra: dict[str, Any] = {"gradient_checkpointing": False}
        if t.loss_type:
            extra["loss_type"] = [t.loss_type]
        if t.label_smoothing:
            extra["label_smoothing"] = t.label_smoothing
        if t.rpo_alpha:  # RPO (Pang et al., 2024): DPO plus an NLL term on the chosen answers
            extra["loss_type"] = [*extra.get("loss_type", ["sigmoid"]), "sft"]
            extra["loss_weights"] = [1.0] * (len(extra["loss_type"]) - 1) + [t.rpo_alpha]
        return DPOConfig(**common, **extra)
    if mode == "kto":
        from trl import KTOConfig

        extra = {"gradient_checkpointing": False}
        if t.loss_type:
            extra["loss_type"] = t.loss_type
        if t.desirable_weight:
            extra["desirable_weight"] = t.desirable_weight
        if t.undesirable_weight:
            extra["undesirable_weight"] = t.undesirable_weight
        return KTOConfig(**common, **extra)
    if mode == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**common, gradient_checkpointing=False)
    if mode == "simpo":
        from trl.experimental.cpo import CPOConfig

        # SimPO (Meng et al., 2024) is CPO with loss_type="simpo" and no BC term unless cpo_alpha asks for one.
        extra = {"loss_type": t.loss_type or "simpo", "cpo_alpha": t.cpo_alpha,
                 "gradient_checkpointing": False}
        if t.simpo_gamma:
            extra["simpo_gamma"] = t.simpo_gamma
        if t.label_smoothing:
            extra["label_smoothing"] = t.label_smoothing
        return CPOConfig(**common, **extra)
    raise ValueError(f"unknown preference mode {mode!r}")


class PreferenceSiteTrainer(SftSiteTrainer):
    """LoRA preference training of the site's private pairs (or KTO rows) in one of :data:`PREFERENCE_MODES`.

    Loading the global adapter, FFA-LoRA, the base residual and held-out evaluation are the SFT trainer's.

    Args:
        base_model: Verified local base model directory.
        train_rows: ``{"prompt", "chosen", "rejected"}`` rows, or ``{"prompt", "completion", "label"}`` for KTO.
        work_dir: Scratch directory for the trainer.
        mode: ``dpo``, ``kto``, ``orpo`` or ``simpo``.
        quantize: 4-bit nf4 base (QLoRA-style preference training).
        checkpoint_steps: Step checkpoints for resuming a killed round (0: off); see :class:`SftSiteTrainer`.
    """

    def __init__(self, base_model: Path, train_rows: list[dict[str, Any]], work_dir: Path, mode: str,
                 quantize: bool = False, checkpoint_steps: int = 0, chat_template: str = "",
                 chat_template_sha256: str = "", device_map: str = "") -> None:
        if mode not in PREFERENCE_MODES:
            raise ValueError(f"mode must be one of {PREFERENCE_MODES}, got {mode!r}")
        super().__init__(base_model, train_rows, work_dir, quantize=quantize, checkpoint_steps=checkpoint_steps,
                         chat_template=chat_template, chat_template_sha256=chat_template_sha256,
                         device_map=device_map)
        self.mode = mode

    def _drop_reference(self) -> None:
        if self.model is not None and REF_ADAPTER in self.model.peft_config:
            self.model.set_adapter("default")
            self.model.delete_adapter(REF_ADAPTER)

    def train_round(self, task: pb.Task, global_state: dict[str, torch.Tensor],
                    progress: Callable[[int, int, float | None], None] | None = None) -> RoundResult:
        """Train one round from ``global_state`` (also the DPO/KTO reference) and return the delta."""
        if task.training.mode != self.mode:
            raise ValueError(f"this trainer runs {self.mode!r}, the task asks for {task.training.mode!r}")
        t = task.training
        round_start = time.perf_counter()
        self._drop_reference()
        self.load_adapter(task.adapter_spec, global_state)  # "default" = global: TRL copies it into "ref"
        trainable = self._set_trainable(freeze_lora_a=task.hints.freeze_lora_a)
        seed = t.seed + task.round
        trainer = proximal_trainer_cls(self.mode)(
            model=self.model, args=_config(self.mode, t, seed, checkpoint_args(self.work_dir, task,
                                                                              self.checkpoint_steps)),
            processing_class=self.tokenizer, train_dataset=_as_dataset(self._rows),
            callbacks=[_Progress(progress)] if progress else None)
        keep_adapter_dtype(self.model)
        trainer.proximal_mu = float(task.hints.proximal_mu)
        trainer.proximal_ref = {n: p.detach().clone() for n, p in trainable.items()} if trainer.proximal_mu > 0 else {}
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        self.last_log_history: list[dict[str, float]] = []
        try:
            start = time.perf_counter()
            out = trainer.train(resume_from_checkpoint=self._resume_point(trainer.args.output_dir, task.round))
            train_loss = float(out.training_loss)
            train_time = time.perf_counter() - start
            steps = int(trainer.state.global_step)
            self.last_log_history = [dict(h) for h in trainer.state.log_history]
        finally:
            self._drop_reference()
        local = self.adapter_state()
        delta = float32_delta(local, global_state)
        examples = t.max_steps * t.per_device_batch_size * max(1, t.gradient_accumulation_steps)
        dataset = trainer.train_dataset
        weight = data_weight(t, len(self._rows), lambda: _answer_tokens(dataset))
        tokens = int(max((h.get("num_tokens", 0) for h in self.last_log_history), default=0)) or _estimate_tokens(
            trainer.train_dataset, examples)
        if self.checkpoint_steps:  # the round is done: its step checkpoints must not resume a later run
            shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
        # The TRL trainer sits in reference cycles with its optimizer state; a long-lived agent that leaves them to
        # the cyclic collector trains later rounds measurably slower (site_train bench), so free them now.
        del trainer, out
        gc.collect()
        return RoundResult(delta, weight, train_loss, train_time, tokens,
                           time.perf_counter() - round_start, steps)


def _answer_tokens(dataset: Any) -> int:
    """Tokens of the answers the preference loss scores (chosen and rejected, or KTO's completion), as tokenised."""
    columns = [c for c in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids") if c in dataset.column_names]
    return sum(len(x) for c in columns for x in dataset[c])


def _estimate_tokens(dataset: Any, examples: int) -> int:
    """Mean tokens per tokenised row (both answers of a pair, prompt included) times the examples seen."""
    columns = [c for c in ("chosen_input_ids", "rejected_input_ids", "input_ids") if c in dataset.column_names]
    if not columns or len(dataset) == 0:
        return 0
    total = sum(len(x) for c in columns for x in dataset[c])
    return int(total / len(dataset) * examples)
