"""Local LoRA SFT with TRL/PEFT: load the global adapter, train a round, return the delta.

The base model and the tokenised dataset are loaded once per process; each round only loads the new global
adapter, resets the optimizer and trains ``max_steps`` steps. Only the adapter delta (local − global) leaves.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcommon import tensors
from fedcommon.models import device_precision, load_base, lora_config, lora_config_for, trainer_precision_args
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.training import fedsb
from site_agent.training.masking import apply_pinned_template, check_template, mask_conversation

log = logging.getLogger(__name__)
# What the launcher asked for, as the process started: the Trainer's Accelerator sets ACCELERATE_USE_DEEPSPEED itself
# once a DeepSpeed trainer ran, which must not read as a launcher flag for the next trainer (see check_launch_env).
_LAUNCH_ENV = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_USE_")}


@dataclass(frozen=True)
class RoundResult:
    """What a round of local training produced.

    Attributes:
        delta: Local adapter minus the global adapter, in the spec's keys and shapes, in float32 (egress casts it to
            the wire dtype after clipping and noise).
        num_examples: The FedAvg weight the site reports: the training examples it holds, or (``weight_by =
            "tokens"``) the tokens of them the loss is computed on; see :func:`data_weight`.
        train_loss: Mean training loss over the round.
        train_time_s: Wall time of the training loop itself.
        tokens: Tokens processed (for tokens/s).
        round_time_s: Wall time of the whole local round: loading the global adapter, trainer set-up, training,
            and computing the delta.
        steps: Optimizer steps the trainer reports it took this round (``global_step``; a resumed round counts
            the steps before the restart too), so a comparison can check the work done, not the work asked for.
    """

    delta: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    train_time_s: float
    tokens: int
    round_time_s: float
    steps: int = 0


class _Progress:
    """A transformers TrainerCallback forwarding (step, max_steps, loss) to a plain function."""

    def __new__(cls, fn: Callable[[int, int, float | None], None]):  # type: ignore[no-untyped-def]
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
                fn(state.global_step, state.max_steps, (logs or {}).get("loss"))

            def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                fn(state.global_step, state.max_steps, None)

        return Callback()


class SftSiteTrainer:
    """LoRA supervised fine-tuning of the site's private chat data (QLoRA when ``quantize``).

    Args:
        base_model: Verified local base model directory.
        train_rows: Rows in ``{"messages": [...]}`` form (already validated).
        work_dir: Scratch directory for the trainer.
        quantize: Load the base in 4-bit nf4 with double quantization (QLoRA, Dettmers et al., 2023); the LoRA
            weights, and so the delta, stay float32.
        checkpoint_steps: Save a step checkpoint (adapter, optimizer, scheduler, RNG) every this many steps, so a
            site killed mid-round resumes that round where it stopped; 0: off.
        deepspeed: A DeepSpeed config (ZeRO stage 1, 2 or 3) for training through accelerate/DeepSpeed; on CPU,
            or outside a launcher, it runs single-process on gloo. None: plain PyTorch. Under ZeRO-3 the model is
            rebuilt from the base each round (see :meth:`train_round`).
        chat_template: The chat template the task carried (``[model] chat_template``); "" for the base's own.
        chat_template_sha256: The task's pin of the template in force; "" for none. The tokenizer's template must
            hash to it (:func:`fedcommon.chat.apply_pinned_template`), or the trainer refuses to start.
        device_map: On CUDA, a transformers ``device_map`` for the base (``"auto"``: spread over the GPUs);
            empty: one device.
        world_size: How many ranks train each round together (under torchrun/accelerate: DDP, or DeepSpeed with a
            config). The task's batch is the site's global batch; each rank takes ``batch / world_size`` of it.
        reuse_trainer: Keep the TRL trainer across rounds (single process, no DeepSpeed): building it (arguments,
            accelerator, collator, dataset checks) each round is federation overhead, not training. A kept trainer
            still starts every round as a fresh one would: new arguments (the round's seeds), the same seeding
            before training, a new optimizer and scheduler, a new trainer state. It is rebuilt when the task's
            training config or adapter spec changes. False: a new trainer every round.
    """

    def __init__(self, base_model: Path, train_rows: list[dict[str, Any]], work_dir: Path,
                 quantize: bool = False, checkpoint_steps: int = 0, deepspeed: dict[str, Any] | None = None,
                 chat_template: str = "", chat_template_sha256: str = "", device_map: str = "",
                 world_size: int = 1, reuse_trainer: bool = True) -> None:
        from transformers import AutoTokenizer

        self.base_model = Path(base_model)
        self.work_dir = Path(work_dir)
        self.quantized = quantize
        self.checkpoint_steps = checkpoint_steps
        self.world_size = world_size
        check_launch_env(deepspeed)
        self.deepspeed = check_deepspeed(deepspeed) if deepspeed else None
        self.zero3 = zero_stage(self.deepspeed) == 3
        self.resumed_from_step = 0  # the step the last round resumed from (0: it started fresh)
        if device_map and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed):
            # Each rank of a data-parallel launch holds a whole replica on its own GPU; a device_map spreading one
            # model over all GPUs would put every rank on the same devices.
            raise ValueError("device_map spreads one model over the GPUs of a single process; it cannot be combined "
                             "with a multi-rank launch or DeepSpeed (leave it empty there)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        # Before anything is tokenised: the federation's template (checked against its pin) replaces the base's own.
        apply_pinned_template(self.tokenizer, chat_template, chat_template_sha256)
        self.template_sha256 = chat_template_sha256
        if train_rows and "messages" in train_rows[0]:
            check_template(self.tokenizer)  # refuse a template no assistant mask comes from before loading weights
        self._device_map = device_map
        self._base: Any = load_base(self.base_model, quantize, device_map=device_map)
        self._rows = train_rows
        self._dataset: Any = None  # tokenised once by the first SFTTrainer, reused after
        # The long-lived TRL trainer and what it was built for (see reuse_trainer); the progress function of the
        # current round, which the trainer's one progress callback forwards to.
        self._reuse = reuse_trainer and deepspeed is None and world_size == 1
        self._trainer: Any = None
        self._trainer_key: tuple[bytes, str] | None = None
        self._progress: Callable[[int, int, float | None], None] | None = None
        self._trainer_frozen = False  # the kept trainer was frozen out of garbage collection
        self.model: Any = None
        self._spec_sha = ""
        self._fedsb_r: dict[str, torch.nn.Parameter] | None = None  # Fed-SB: the R matrices, the only trained tensors
        self._pristine: dict[str, torch.Tensor] = {}  # base weights before any residual was folded in
        # The model's LoRA parameters by adapter key, once the first load checked them against the spec: later loads
        # of the same spec copy straight into them (see load_adapter). Cleared whenever the model is replaced.
        self._lora_params: dict[str, torch.Tensor] | None = None
        self._eval_batches: _EvalBatches | None = None  # the held-out rows, tokenised once (see evaluate)
        # Keep the long-lived model and libraries out of every later collection: train_round collects each round's
        # trainer, and that then costs milliseconds instead of half a second. Collect first, so no garbage is frozen.
        gc.collect()
        gc.freeze()

    def _base_model(self) -> Any:
        """The base model, loaded again when the last ZeRO-3 round left it partitioned (and dropped it)."""
        if self._base is None:
            # Whole on every rank, as in the first round: a live ZeRO-3 config would make from_pretrained load it
            # already partitioned (zero.Init), and the residual and adapter could then not be written into it.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._base = load_base(self.base_model, self.quantized, device_map=self._device_map)
        return self._base

    def _ensure_model(self, spec: pb.AdapterSpec) -> Any:
        from peft import get_peft_model

        if self.model is None:
            if self._spec_sha and self._spec_sha != spec.sha256:
                raise ValueError("the federation changed its adapter spec mid-run; restart the agent to follow it")
            self.model = get_peft_model(self._base_model(), lora_config(spec))
            self._spec_sha = spec.sha256
            self._lora_params = None
            if fedsb.is_fedsb_spec(spec):
                if self.zero3 or self.checkpoint_steps:
                    raise ValueError("Fed-SB (strategy fed-sb) does not run under DeepSpeed ZeRO-3 or with step "
                                     "checkpoints (checkpoint_steps); turn them off in site.toml for this federation")
                self._fedsb_r = fedsb.install(self.model)
        elif self._spec_sha != spec.sha256:
            raise ValueError("the federation changed its adapter spec mid-run; restart the agent to follow it")
        return self.model

    def probe_adapter(self, rank: int = 4) -> tuple[pb.AdapterSpec, dict[str, torch.Tensor]]:
        """A fresh all-linear adapter on this trainer's base and its spec, for preflight's one real training step."""
        from peft import get_peft_model, get_peft_model_state_dict

        if self.model is not None:
            raise ValueError("probe_adapter is for a trainer that has not trained yet")
        self.model = get_peft_model(self._base_model(), lora_config_for(rank, 2.0 * rank, 0.0, "all-linear"))
        state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        spec = tensors.make_adapter_spec(state, rank, 2.0 * rank, 0.0,
                                         sorted(self.model.peft_config["default"].target_modules))
        self._spec_sha = spec.sha256
        return spec, state

    def load_adapter(self, spec: pb.AdapterSpec, state: dict[str, torch.Tensor]) -> None:
        """Put ``state`` into the model's LoRA weights (after checking it against the spec).

        The first load checks the model's own LoRA weights against the spec and goes through PEFT; it also finds
        the parameter behind each adapter key. Every later load (twice a round: the global before training, and
        again before the held-out evaluation) copies ``state`` straight into those parameters, which is what PEFT's
        loader ends in, without walking the whole model's state dict each time (about 10 ms of a tiny model's
        round, on its critical path).
        """
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        tensors.check_against_spec(state, spec)
        model = self._ensure_model(spec)
        if self._fedsb_r is not None:
            fedsb.load(self._fedsb_r, state)
            return
        if self._lora_params is not None:
            with torch.no_grad():
                for key, param in self._lora_params.items():
                    param.copy_(state[key])
            return
        mine = get_peft_model_state_dict(model)
        # The LoRA weights train in float32 whatever the wire dtype: compare keys and shapes in the spec's dtype.
        wire = {t.name: tensors.torch_dtype(t.dtype) for t in spec.tensors}
        tensors.check_against_spec({k: v.detach().to(wire.get(k, v.dtype)) for k, v in mine.items()}, spec)
        set_peft_model_state_dict(model, state)
        if not self.zero3:  # ZeRO-3 partitions the parameters after this load: its views would be empty slices
            self._lora_params = _parameters_behind(model, mine)

    def set_base_residual(self, residual: dict[str, torch.Tensor]) -> None:
        """Make the base weights ``W0 + residual`` (FedEx-LoRA's folded correction, already scaled).

        ``residual`` is the federation's cumulative residual, keyed by base weight name and in each weight's own
        layout (the coordinator transposes it for ``[in, out]`` Conv1D weights); weights it does not name go back
        to their pristine values.

        Raises:
            ValueError: A name that is not a base weight, a shape mismatch, or a non-finite value.
        """
        if residual and self.quantized:
            raise ValueError("a base residual cannot be folded into a 4-bit (qlora) base model")
        params = dict(self._base_model().named_parameters())
        for name, value in residual.items():
            target = name if name in params else name.replace(".weight", ".base_layer.weight")
            if not name.endswith(".weight") or target not in params:
                raise ValueError(f"base residual names {name!r}, which is not a weight of the base model")
            if tuple(value.shape) != tuple(params[target].shape):
                raise ValueError(f"base residual {name!r} has shape {tuple(value.shape)}, the weight has "
                                 f"{tuple(params[target].shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"base residual {name!r} holds NaN or Inf values")
        with torch.no_grad():
            wanted = {(n if n in params else n.replace(".weight", ".base_layer.weight")): v for n, v in residual.items()}
            for target in set(self._pristine) | set(wanted):
                param = params[target]
                if target not in self._pristine:
                    self._pristine[target] = param.detach().clone()
                base = self._pristine[target]
                param.copy_(base + wanted[target].to(base.dtype) if target in wanted else base)

    def _set_trainable(self, freeze_lora_a: bool) -> dict[str, torch.nn.Parameter]:
        """Make the LoRA weights trainable, except A under FFA-LoRA (Sun et al., ICLR 2024), and all but R under
        Fed-SB; return them by name."""
        if self._fedsb_r is not None:
            return fedsb.set_trainable(self.model, self._fedsb_r)
        trainable = {}
        for name, param in self.model.named_parameters():
            if "lora_" not in name:
                continue
            param.requires_grad = not (freeze_lora_a and "lora_A" in name)
            if param.requires_grad:
                trainable[name] = param
        return trainable

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        if self._fedsb_r is not None:
            return fedsb.state(self._fedsb_r)
        # On CPU so the delta is computed and encoded where the global state lives, whatever device trained; from
        # the parameters found at the first load (the same tensors PEFT's state dict views) where there are some.
        state = self._lora_params if self._lora_params is not None else get_peft_model_state_dict(self.model)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _partitioned_adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole LoRA tensors of a model ZeRO-3 partitioned over the ranks (a collective: every rank calls it).

        Each rank holds a slice of every parameter after ZeRO-3 training (the rest of the tensor is empty); the
        LoRA parameters, which are small, are gathered whole for the copy and partitioned again afterwards.
        """
        import deepspeed

        lora = [p for n, p in self.model.named_parameters() if "lora_" in n]
        with deepspeed.zero.GatheredParameters(lora, modifier_rank=None):
            return self.adapter_state()

    def _drop_partitioned_model(self, trainer: Any) -> None:
        """Forget a model ZeRO-3 partitioned, so the next round starts again from a whole base.

        Its parameters are slices tied to this round's engine and hooks; a new engine cannot be built over them,
        and the next round's adapter (or a FedEx residual) could not simply be copied in. Loading the base again
        costs a read of the weights per round, and nothing else in the round changes.
        """
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        engine = trainer.model_wrapped
        if hasattr(engine, "destroy"):
            engine.destroy()  # removes ZeRO-3's module hooks and frees its partitions
        trainer.model = trainer.model_wrapped = trainer.deepspeed = None
        self.model = self._base = None
        self._lora_params = None
        unset_hf_deepspeed_config()

    def train_round(self, task: pb.Task, global_state: dict[str, torch.Tensor],
                    progress: Callable[[int, int, float | None], None] | None = None) -> RoundResult:
        """Train one round from ``global_state`` and return the delta."""
        from trl import SFTConfig

        t = task.training
        round_start = time.perf_counter()
        if self.zero3 and task.hints.proximal_mu > 0:
            # The proximal term reads whole adapter weights in the loss; ZeRO-3 only holds them whole inside the
            # forward pass of their own module.
            raise ValueError("FedProx (hints.proximal_mu > 0) is not supported under DeepSpeed ZeRO-3 (use ZeRO-2, "
                             "or a strategy without a proximal term)")
        self.load_adapter(task.adapter_spec, global_state)
        trainable = self._set_trainable(freeze_lora_a=task.hints.freeze_lora_a)
        args = SFTConfig(
            max_steps=t.max_steps,
            per_device_train_batch_size=per_rank_batch(t.per_device_batch_size, self.world_size),
            gradient_accumulation_steps=max(1, t.gradient_accumulation_steps), learning_rate=t.learning_rate,
            weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, lr_scheduler_type=_scheduler(t),
            max_length=t.max_length, seed=t.seed + task.round, data_seed=t.seed + task.round,
            # The dataset arrives tokenised with "assistant_masks" (masked_dataset), from which TRL builds the labels;
            # its own assistant_only_loss would refuse templates without {% generation %} markers.
            assistant_only_loss=False, **precision_args(self.deepspeed),
            gradient_checkpointing=False, report_to=[], logging_steps=max(1, t.max_steps // 4), disable_tqdm=True,
            **checkpoint_args(self.work_dir, task, self.checkpoint_steps), deepspeed=self.deepspeed,
            dataloader_num_workers=0, remove_unused_columns=True)
        trainer = self._round_trainer(task, args, progress)
        # FedProx (Li et al., MLSys 2020): mu/2 * ||w - w_global||^2 over the trainable adapter weights.
        keep_adapter_dtype(self.model)
        trainer.proximal_mu = float(task.hints.proximal_mu)
        trainer.proximal_ref = {n: p.detach().clone() for n, p in trainable.items()} if trainer.proximal_mu > 0 else {}
        if self._dataset is None:
            self._dataset = trainer.train_dataset
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=self._resume_point(args.output_dir, task.round))
        train_loss = float(out.training_loss)
        train_time = time.perf_counter() - start
        steps = int(trainer.state.global_step)
        self.last_engine = type(trainer.model_wrapped).__name__  # "DeepSpeedEngine" when DeepSpeed trained the round
        local = self._partitioned_adapter_state() if self.zero3 else self.adapter_state()
        delta = float32_delta(local, global_state)
        examples = t.max_steps * t.per_device_batch_size * max(1, t.gradient_accumulation_steps)
        weight = data_weight(t, len(self._rows), lambda: self._loss_tokens(t.max_length))
        tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
        if not tokens:
            lengths = [len(x) for x in self._dataset["input_ids"]]
            tokens = int(sum(lengths) / max(1, len(lengths)) * examples)
        if self.checkpoint_steps:  # the round is done: its step checkpoints must not resume a later run
            shutil.rmtree(args.output_dir, ignore_errors=True)
        if self.zero3:
            self._drop_partitioned_model(trainer)
        # The TRL trainer sits in reference cycles with its optimizer state; a long-lived agent that leaves them to
        # the cyclic collector trains later rounds measurably slower (site_train bench), so free them now. A kept
        # trainer drops this round's optimizer, scheduler and references to the global state.
        if trainer is self._trainer:
            trainer.optimizer = trainer.lr_scheduler = None
            trainer.proximal_ref = {}
        del trainer, out
        gc.collect()
        if self._trainer is not None and not self._trainer_frozen:
            # The kept trainer lives as long as the agent: out of every later collection, like the model.
            gc.freeze()
            self._trainer_frozen = True
        if self.zero3:  # the dropped model was frozen out of collection with the rest at start-up: let it go
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        return RoundResult(delta, weight, train_loss, train_time, tokens,
                           time.perf_counter() - round_start, steps)

    def _round_trainer(self, task: pb.Task, args: Any,
                       progress: Callable[[int, int, float | None], None] | None) -> Any:
        """This round's TRL trainer: the kept one set up for the round, or a new one (kept when reusing)."""
        from transformers.trainer_callback import PrinterCallback
        from transformers.trainer_utils import enable_full_determinism, set_seed

        self._progress = progress
        key = (task.training.SerializeToString(deterministic=True), task.adapter_spec.sha256)
        if self._trainer is not None and self._trainer_key == key and self._trainer.model is self.model:
            trainer = self._trainer
            # Everything a new trainer would start from, in its constructor's order: the round's arguments (seeds,
            # output folder; the rest is equal, as the key is), its seeding, a new accelerator (building the
            # arguments reset the process-wide accelerator state, and the accelerator's data loaders take the
            # round's data seed), a new optimizer and scheduler (FedAvg restarts local optimisation every round);
            # train() itself makes a new TrainerState.
            trainer.args = args
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            trainer.create_accelerator_and_postprocess()
            trainer.optimizer = trainer.lr_scheduler = None
            return trainer
        if self._trainer is not None:  # a new config: the kept trainer goes, and out of the frozen generation
            self._trainer = self._trainer_key = None
            if self._trainer_frozen:
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                self._trainer_frozen = False
        callbacks = [_Progress(self._forward_progress)] if progress or self._reuse else None
        trainer = proximal_trainer_cls("sft")(
            model=self.model, args=args, processing_class=self.tokenizer,
            train_dataset=self._dataset if self._dataset is not None else masked_dataset(self.tokenizer, self._rows),
            callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; progress goes through `progress`
        if self._reuse:
            self._trainer, self._trainer_key = trainer, key
        return trainer

    def _forward_progress(self, step: int, max_steps: int, loss: float | None) -> None:
        if self._progress is not None:
            self._progress(step, max_steps, loss)

    def _loss_tokens(self, max_length: int) -> int:
        """Assistant tokens of the training rows within ``max_length``: the tokens the SFT loss is computed on."""
        if self._dataset is not None and "assistant_masks" in self._dataset.column_names:
            masks = self._dataset["assistant_masks"]
        else:
            masks = [mask_conversation(self.tokenizer, row["messages"]).assistant_mask for row in self._rows]
        return int(sum(sum(m[:max_length]) for m in masks))

    def _resume_point(self, output_dir: str, round: int) -> str | None:
        """The last complete step checkpoint of this exact round and task, if a killed run left one.

        The trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off mid-save by the kill
        and is skipped (the previous one is only rotated away after the next one is complete).
        """
        done = sorted(((int(p.name.rsplit("-", 1)[1]), p) for p in Path(output_dir).glob("checkpoint-*")
                       if p.name.rsplit("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()),
                      key=lambda x: x[0]) if self.checkpoint_steps else []
        self.resumed_from_step, last = done[-1] if done else (0, None)
        if last is not None:
            log.info("[Site.train] round=%d resuming from step %d", round, self.resumed_from_step)
        return str(last) if last is not None else None

    @torch.no_grad()
    def evaluate(self, spec: pb.AdapterSpec, state: dict[str, torch.Tensor], rows: list[dict[str, Any]],
                 max_length: int = 512, batch_size: int = 32) -> tuple[float, int]:
        """Mean next-token loss on the assistant tokens of ``rows`` with ``state`` as the adapter.

        The agent scores the same held-out rows every round: they are tokenised once (kept while ``rows`` is the
        same list, with the same ``max_length`` and ``batch_size``). Only the scored positions' logits are
        computed (the model's ``logits_to_keep`` with a mask, where it takes one): the vocabulary projection of
        every other position is work whose result nobody reads.

        Returns:
            ``(loss, tokens)``: token-weighted mean cross-entropy and how many tokens were scored.
        """
        self.load_adapter(spec, state)
        cached = self._eval_batches
        if cached is None or cached.rows is not rows or cached.key != (max_length, batch_size):
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            cached = self._eval_batches = _EvalBatches(rows, (max_length, batch_size), [
                _eval_batch(self.tokenizer, rows[i:i + batch_size], max_length, pad)
                for i in range(0, len(rows), batch_size)])
        device = self.model.get_input_embeddings().weight.device
        masked = "logits_to_keep" in inspect.signature(self.model.get_base_model().forward).parameters
        self.model.eval()
        total, count = 0.0, 0
        try:
            for ids, attn, keep, target in cached.batches:
                if not len(target):
                    continue
                ids, attn, keep, target = ids.to(device), attn.to(device), keep.to(device), target.to(device)
                logits = self.model(input_ids=ids, attention_mask=attn,
                                    **({"logits_to_keep": keep} if masked else {})).logits
                if logits.shape != (len(target), logits.shape[-1]):
                    if masked:  # a forward that takes logits_to_keep, but not as a mask: every position instead
                        masked = False
                        logits = self.model(input_ids=ids, attention_mask=attn).logits
                    logits = logits[keep]
                loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
                total += float(loss)
                count += len(target)
        finally:
            self.model.train()
        if count == 0:
            raise ValueError("held-out data has no assistant tokens to score")
        mean = total / count
        if not math.isfinite(mean):
            raise ValueError("held-out loss is not finite")
        return mean, count


@dataclass(frozen=True)
class _EvalBatches:
    """Held-out rows tokenised for :meth:`SiteTrainer.evaluate`, for one list of rows and ``(max_length,
    batch_size)``."""

    rows: list[dict[str, Any]]
    key: tuple[int, int]
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _eval_batch(tokenizer: Any, rows: list[dict[str, Any]], max_length: int, pad: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One held-out batch: input ids and attention mask (right-padded), the mask of positions whose next token is
    an assistant token, and those next tokens in the mask's row-major order."""
    ids_list, mask_list = [], []
    for row in rows:
        enc = mask_conversation(tokenizer, row["messages"])
        ids_list.append(enc.input_ids[:max_length])
        mask_list.append(enc.assistant_mask[:max_length])
    width = max(len(x) for x in ids_list)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids_list])
    attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_list])
    scored = torch.tensor([[bool(m) for m in x] + [False] * (width - len(x)) for x in mask_list])
    keep = torch.zeros_like(scored)
    keep[:, :-1] = scored[:, 1:]  # the logits at position p predict the token at p + 1
    return ids, attn, keep, ids[:, 1:][keep[:, :-1]]


def _parameters_behind(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The model parameter each of PEFT's state-dict tensors is a view of (same storage and shape), by key; None if
    any of them is not one (then every load goes through PEFT)."""
    params = {p.data_ptr(): p for n, p in model.named_parameters() if "lora_" in n}
    out = {}
    for key, view in state.items():
        param = params.get(view.data_ptr())
        if param is None or param.shape != view.shape:
            return None
        out[key] = param
    return out


def data_weight(t: pb.TrainingConfig, num_rows: int, loss_tokens: Callable[[], int]) -> int:
    """The FedAvg weight a site reports: what it holds, not what the task made it run.

    Every site runs the same ``max_steps × batch`` per round, so weighting by steps would weigh every site alike
    whatever its data. ``weight_by = "examples"`` (the default) reports the training examples held;
    ``"tokens"`` the tokens of them the loss is computed on (``loss_tokens``: SFT counts assistant tokens within
    ``max_length``), so sites with long answers weigh more.
    """
    if t.weight_by == "tokens":
        return int(loss_tokens())
    if t.weight_by not in ("", "examples"):
        raise ValueError(f"unsupported weight_by {t.weight_by!r}")
    return num_rows


def check_deepspeed(config: dict[str, Any]) -> dict[str, Any]:
    """Check a site's DeepSpeed config and prepare a single-process run when no launcher set one up.

    Under a launcher (``torchrun``/``accelerate launch``) its ranks train together and ZeRO-1/2 shards the optimizer
    state over them; ZeRO-3 partitions the parameters too. The base is loaded whole on each rank (no
    ``zero.Init``) and partitioned when the round's engine starts; the trainer gathers the LoRA tensors to read
    the delta and rebuilds the model from the base for the next round.

    Raises:
        ImportError: deepspeed is not installed (the ``site`` extra).
        ValueError: An unknown ZeRO stage.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ImportError("a DeepSpeed config needs deepspeed: install the 'site' extra (pip install "
                          "'fedbridge[site]')") from e
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage {stage} does not exist (use 0, 1, 2 or 3)")
    # No torchrun/deepspeed launcher set up a process group: run as a single process on gloo (DeepSpeed needs one).
    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return config


def check_launch_env(deepspeed: dict[str, Any] | None, env: dict[str, str] | None = None) -> None:
    """Refuse what ``accelerate launch`` can switch on behind the trainer's back, where the delta would be wrong.

    ``accelerate launch`` starts the ranks like ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and also
    leaves flags the Trainer's Accelerator reads. FSDP (``--use_fsdp``) shards the parameters into DTensors this
    trainer does not gather, so the adapter it read would be a shard; DeepSpeed from the launcher's own config
    (``--use_deepspeed`` without the site's ``deepspeed``) may be ZeRO-3 without the trainer knowing; and ``--cpu``
    turns DeepSpeed off while the site's config still says it is on.

    Raises:
        ValueError: One of those, naming the flag and what to do instead.
    """
    env = _LAUNCH_ENV if env is None else env

    def flag(name: str) -> bool:
        return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")

    if flag("ACCELERATE_USE_FSDP"):
        raise ValueError("FSDP (accelerate launch --use_fsdp) is not supported by the site trainer: it would read a "
                         "shard of the adapter, not the adapter; use DeepSpeed ZeRO-3 (site.toml deepspeed) to "
                         "partition a base that does not fit one GPU")
    if flag("ACCELERATE_USE_DEEPSPEED") and not deepspeed:
        raise ValueError("accelerate launch --use_deepspeed without the site's own DeepSpeed config: set "
                         "'deepspeed' in site.toml (the trainer must know the ZeRO stage) and launch with "
                         "--multi_gpu, or with torchrun")
    if flag("ACCELERATE_USE_CPU") and deepspeed:
        raise ValueError("accelerate launch --cpu turns DeepSpeed off, but site.toml sets 'deepspeed': launch "
                         "with --multi_gpu (it runs on CPU too) or leave 'deepspeed' unset")


def zero_stage(config: dict[str, Any] | None) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0: none, and without a config)."""
    try:
        return int(((config or {}).get("zero_optimization") or {}).get("stage", 0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"DeepSpeed config: zero_optimization.stage must be an integer, got "
                         f"{(config or {}).get('zero_optimization', {}).get('stage')!r}") from e


def precision_args(deepspeed: dict[str, Any] | None, device: tuple[bool, bool] | None = None) -> dict[str, bool]:
    """The trainer's precision flags: the device's (bf16/fp16 autocast on CUDA, fp32 on CPU), except where a
    DeepSpeed config sets ``bf16.enabled`` / ``fp16.enabled`` to a boolean: transformers refuses a config that
    disagrees with the arguments, and the site's explicit DeepSpeed choice wins.

    Args:
        deepspeed: The site's DeepSpeed config, or None.
        device: ``(cuda, bf16_supported)``; None: this machine's.
    """
    args = trainer_precision_args(*(device or device_precision()))
    for key in ("bf16", "fp16"):
        enabled = ((deepspeed or {}).get(key) or {}).get("enabled")
        if isinstance(enabled, bool):
            args[key] = enabled
            if enabled:  # one half-precision mode at a time
                args["fp16" if key == "bf16" else "bf16"] = False
    return args


def per_rank_batch(batch: int, world_size: int) -> int:
    """Each rank's share of the task's batch, which is the whole site's batch however many ranks train it.

    Raises:
        ValueError: The batch does not split evenly over the ranks (the site would train a different batch than the
            federation asked for).
    """
    if batch % world_size:
        raise ValueError(f"the task's batch of {batch} does not divide over this site's {world_size} ranks; run "
                         f"the site on a number of ranks that divides it")
    return batch // world_size


def checkpoint_args(work_dir: Path, task: pb.Task, every: int) -> dict[str, Any]:
    """Trainer arguments for step checkpoints of this round, in a folder keyed by everything that shapes the round.

    The key covers the federation, round, global adapter, adapter spec, training config and hints, so a checkpoint
    only ever resumes the very same round of the very same task.
    """
    if not every:
        return {"output_dir": str(work_dir / "trainer"), "save_strategy": "no"}
    key = hashlib.sha256(b"\0".join([task.federation_id.encode(), str(task.round).encode(),
                                      task.global_adapter_sha256.encode(), task.adapter_spec.sha256.encode(),
                                      task.training.SerializeToString(deterministic=True),
                                      task.hints.SerializeToString(deterministic=True)])).hexdigest()[:16]
    return {"output_dir": str(work_dir / "checkpoints" / f"round-{task.round}-{key}"), "save_strategy": "steps",
            "save_steps": every, "save_total_limit": 1}


def _scheduler(t: pb.TrainingConfig) -> str:
    kind = t.lr_scheduler_type or "constant"
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unsupported lr_scheduler_type {kind!r}")
    return "constant_with_warmup" if kind == "constant" and t.warmup_ratio > 0 else kind


def float32_delta(local: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``local - global`` in float32, keyed like the global adapter.

    The LoRA weights train in float32; a bfloat16 wire adapter is only cast at egress (after clipping and noise),
    so the delta is never rounded twice.
    """
    return {k: (local[k].to(torch.float32) - global_state[k].to(torch.float32)).contiguous() for k in global_state}


def keep_adapter_dtype(model: Any) -> None:
    """Undo TRL's cast of LoRA weights to bf16 on a quantized base: the adapter spec (and the wire) is float32.

    TRL 1.16 casts every trainable parameter of a quantized model to bf16 in its trainer's constructor (QLoRA paper
    recommendation); the optimizer is built later, in ``train()``, so restoring float32 here is safe.
    """
    for name, param in model.named_parameters():
        if "lora_" in name and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


@functools.cache
def proximal_trainer_cls(mode: str) -> Any:
    """TRL's trainer for ``mode`` plus an optional FedProx proximal term (``proximal_mu``, ``proximal_ref``).

    ``sft``/``qlora``: SFTTrainer; ``dpo``: DPOTrainer; ``kto``: KTOTrainer; ``orpo``: ORPOTrainer; ``simpo``:
    CPOTrainer (TRL implements SimPO as CPO with ``loss_type="simpo"``).
    """
    if mode in ("sft", "qlora"):
        from trl import SFTTrainer as Base
    elif mode == "dpo":
        from trl import DPOTrainer as Base
    elif mode == "kto":
        from trl import KTOTrainer as Base
    elif mode == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Base
    elif mode == "simpo":
        from trl.experimental.cpo import CPOTrainer as Base
    else:
        raise ValueError(f"unknown training mode {mode!r}")

    class FedTrainer(Base):  # type: ignore[misc,valid-type]
        proximal_mu: float = 0.0
        proximal_ref: dict[str, torch.Tensor] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self.proximal_mu <= 0:
                return out
            params = dict(model.named_parameters())
            prox = sum(((params[n] - ref.to(params[n].device)) ** 2).sum() for n, ref in self.proximal_ref.items())
            if return_outputs:
                return out[0] + 0.5 * self.proximal_mu * prox, out[1]
            return out + 0.5 * self.proximal_mu * prox

    FedTrainer.__name__ = f"Fed{Base.__name__}"
    return FedTrainer


def _as_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


def masked_dataset(tokenizer: Any, rows: list[dict[str, Any]]) -> Any:
    """Chat rows tokenised with the project's assistant masks (``input_ids``, ``assistant_masks``) for SFTTrainer.

    TRL skips its own tokenisation for a dataset that has ``input_ids`` and turns ``assistant_masks`` into labels
    (-100 elsewhere), then truncates to ``max_length``; so the template is never asked for generation markers.
    """
    from datasets import Dataset

    encoded = [mask_conversation(tokenizer, row["messages"]) for row in rows]
    return Dataset.from_dict({"input_ids": [e.input_ids for e in encoded],
                              "assistant_masks": [e.assistant_mask for e in encoded]})
