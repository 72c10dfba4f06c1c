"""The site agent's task loop: join, fetch a task, verify, train, sign, upload, report. Read top to bottom."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcommon import compress, tensors
from fedcommon.auditlog import AuditLog
from fedcommon.chat import TemplateError, TemplateMismatch, template_sha256
from fedcommon.durable import write_durable
from fedcommon.manifest import ManifestMismatch, verify_model_dir
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.client import CoordinatorClient, LateUpdateRefused, error_summary
from site_agent.config import SiteConfig
from site_agent.egress import secagg
from site_agent.egress.dp import LEDGER_NAME, DpSettings, PrivacyLedger, check_budget, resolve
from site_agent.egress.feedback import FeedbackStore
from site_agent.egress.filters import CastFilter, CompressFilter, apply_filters
from site_agent.egress.guard import EgressGuard, EgressRefusal
from site_agent.policy import (
    AuditSink,
    LogAuditSink,
    PolicyRefusal,
    check_coordinator,
    check_task,
    check_upload_size,
    load_policy,
)
from site_agent.ranks import Ranks
from site_agent.training.data import load_for_mode, load_jsonl, load_sft
from site_agent.training.evaluation import is_mcq, mcq_accuracy

# Written when the coordinator says the federation is DONE: a later start of this agent exits 0 at once.
DONE_MARKER = "federation-done.json"
log = logging.getLogger(__name__)
AGENT_VERSION = "fedbridge-site/0.1.0"
# Test-only fault: ``<round>`` makes the agent fail at the first training step of that round (as a data or training
# error would), so a test sees the site report its own crash. The message holds a path and a quoted value on
# purpose: neither may reach the coordinator.
FAIL_ENV = "FEDBRIDGE_TEST_SITE_FAIL"
# Test-only: ``<round>:<seconds>`` holds this site's upload of that round back, so a test can see a round with one
# update in and another to come (sites training alike otherwise upload at the same moment).
UPLOAD_DELAY_ENV = "FEDBRIDGE_TEST_SITE_UPLOAD_DELAY"


def _test_upload_delay(round: int) -> None:
    at, _, seconds = os.environ.get(UPLOAD_DELAY_ENV, "").partition(":")
    if at == str(round):
        time.sleep(float(seconds))


def _test_fault(round: int, step: int) -> None:
    if step >= 1 and os.environ.get(FAIL_ENV) == str(round):
        raise RuntimeError(f"injected training failure at step {step} reading /data/private/train.jsonl row "
                           "'patient 17: diagnosis'")


class SiteRefusal(RuntimeError):
    """The site refuses a task (the message names the reason); nothing was trained or sent."""


class TemplateRefusal(SiteRefusal):
    """The site refuses the task's chat template: it misses its pin, or no assistant mask comes from it."""


@dataclass
class _BaseModelCheck:
    """Re-hashes the base model only when a file's size or mtime changed since the last good check."""

    path: Path
    verified_sha: str = ""
    stamp: tuple[tuple[str, int, int], ...] = ()

    def _stamp(self) -> tuple[tuple[str, int, int], ...]:
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(self.path.rglob("*")) if p.is_file())

    def verify(self, expected_sha: str) -> None:
        stamp = self._stamp()
        if expected_sha == self.verified_sha and stamp == self.stamp:
            return
        try:
            verify_model_dir(self.path, expected_sha)
        except ManifestMismatch as e:
            raise SiteRefusal(f"refusing to train: {e}") from None
        self.verified_sha, self.stamp = expected_sha, stamp


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SiteRefusal(f"{path}: the envelope signing key must be Ed25519")
    return key


def make_trainer(mode: str, base_model: Path, train_path: Path, work_dir: Path,  # type: ignore[no-untyped-def]
                 checkpoint_steps: int = 0, deepspeed: Path | None = None, chat_template: str = "",
                 chat_template_sha256: str = "", device_map: str = "", world_size: int = 1):
    """The site trainer for ``mode``, on the training file read in the format that mode needs.

    ``chat_template`` / ``chat_template_sha256`` are the task's template and pin (already checked against each
    other by :func:`check_template_pin`); the trainer checks the tokenizer's template in force against the pin.

    Raises:
        SiteRefusal: The training file is not in the format the mode trains on, or the template is refused.
    """
    from site_agent.training.data import DataError
    from site_agent.training.preference import PREFERENCE_MODES, PreferenceSiteTrainer
    from site_agent.training.trainer import SftSiteTrainer

    try:
        rows = load_for_mode(train_path, mode)
    except DataError as e:
        raise SiteRefusal(f"refusing task: the training data does not suit mode {mode!r}: {e}") from None
    ds = json.loads(Path(deepspeed).read_text()) if deepspeed else None
    if ds and mode != "sft":  # the preference trainers and a 4-bit base under DeepSpeed are not tested yet
        raise SiteRefusal(f"refusing task: this site's DeepSpeed config is wired for mode 'sft' only, not {mode!r}")
    if world_size > 1 and mode != "sft":  # the preference and 4-bit trainers are not tested on several ranks yet
        raise SiteRefusal(f"refusing task: a site on {world_size} ranks trains mode 'sft' only, not {mode!r}; run "
                          f"it as one process")
    try:
        if mode in PREFERENCE_MODES:
            return PreferenceSiteTrainer(base_model, rows, work_dir, mode, checkpoint_steps=checkpoint_steps,
                                         chat_template=chat_template, chat_template_sha256=chat_template_sha256,
                                         device_map=device_map)
        if mode in ("sft", "qlora"):
            return SftSiteTrainer(base_model, rows, work_dir, quantize=mode == "qlora",
                                  checkpoint_steps=checkpoint_steps, deepspeed=ds, chat_template=chat_template,
                                  chat_template_sha256=chat_template_sha256, device_map=device_map,
                                  world_size=world_size)
    except (TemplateMismatch, TemplateError) as e:
        raise TemplateRefusal(f"refusing task: {e}") from None
    raise SiteRefusal(f"refusing task: training mode {mode!r} is not supported by this agent")


def check_template_pin(task: pb.Task) -> None:
    """Refuse a task whose chat template does not hash to the task's own pin (before it reaches any tokenizer).

    The template is data: transformers renders it in its sandboxed Jinja environment, it is never run as code.
    The pin is checked anyway so a site trains with exactly the template the federation agreed on.

    Raises:
        TemplateRefusal: The template's SHA-256 is not the pin, or a template comes without a pin.
    """
    if not task.chat_template:
        return
    got = template_sha256(task.chat_template)
    if got != task.chat_template_sha256:
        raise TemplateRefusal(f"refusing task: the chat template it carries hashes to {got[:16]}…, but the task "
                               f"pins {task.chat_template_sha256[:16] or '(nothing)'}…")


def run_site(cfg: SiteConfig, show_progress: bool = True, audit: AuditSink | None = None,
             ranks: Ranks | None = None) -> int:
    """Serve the federation until it is done. Returns the number of rounds this site trained.

    Under a launcher (``torchrun``, ``accelerate launch``) every rank runs this: rank 0 serves the federation and
    hands each round to the others, which train it with it (see ``site_agent/ranks.py``).

    Raises:
        PolicyRefusal: The coordinator or a task is outside the site's policy (recorded in ``audit`` first).
        SiteRefusal: The task cannot run here (base model mismatch, data unsuitable for the mode).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks = ranks or Ranks.from_env()
    try:
        if not ranks.is_main:
            return _follow_rounds(cfg, ranks)
        return _serve(cfg, show_progress, audit, ranks)
    finally:
        ranks.close()


def _follow_rounds(cfg: SiteConfig, ranks: Ranks) -> int:
    """A rank other than 0: train every round rank 0 hands over, until it hands over none. Nothing leaves from here.

    Returns:
        The number of rounds this rank helped train.
    """
    base_check = _BaseModelCheck(cfg.base_model)  # each rank checks the weights it loads (ranks may be on other hosts)
    trainer, trained = None, 0
    while True:
        parts = ranks.broadcast_bytes(None)
        if not parts:  # rank 0 is done (or stopped): leave with it
            return trained
        task_bytes, global_bytes, residual_bytes = parts
        task = pb.Task.FromString(task_bytes)
        base_check.verify(task.base_model_sha256)
        if trainer is None:
            check_template_pin(task)  # every rank trains with the template the task pins, checked where it is used
            os.makedirs(cfg.work_dir, exist_ok=True)
            trainer = make_trainer(task.training.mode or "sft", cfg.base_model, cfg.data.train, cfg.work_dir,
                                   cfg.checkpoint_steps, cfg.deepspeed, task.chat_template, task.chat_template_sha256,
                                   world_size=ranks.world)
        trainer.set_base_residual(tensors.decode_state(residual_bytes) if residual_bytes else {})
        trainer.train_round(task, global_adapter_state(task, global_bytes))
        trained += 1


def global_adapter_state(task: pb.Task, data: bytes) -> dict[str, torch.Tensor]:
    """The round's global adapter from its downloaded bytes: decoded (and checked) when the coordinator sends it
    compressed (``[lora] compress_download``), else the dense safetensors as stored."""
    if task.global_adapter_compressed:
        return compress.decode_update(data, task.adapter_spec, topk=False)
    return tensors.decode_state(data)


def egress_delta(delta: dict[str, torch.Tensor], dp: DpSettings, task: pb.Task,
                 work_dir: Path) -> dict[str, torch.Tensor]:
    """The round's delta as it may leave the site: the egress filters clip -> DP noise (``dp``) -> cast to the
    spec's wire dtype, or, with ``[lora]`` compression, encode with error feedback (this round's residual is on disk
    in ``work_dir`` before this returns, so before anything is sent).

    Raises:
        SiteRefusal: The error-feedback store cannot be read.
    """
    last: CastFilter | CompressFilter
    feedback = None
    if task.adapter_spec.compression.encoding:
        feedback = FeedbackStore(work_dir, task.federation_id, task.adapter_spec.sha256)
        try:
            _, previous = feedback.load_before(task.round)
        except ValueError as e:
            raise SiteRefusal(f"refusing task: {e}") from None
        last = CompressFilter(task.adapter_spec, previous)
    else:
        last = CastFilter.for_spec([t.dtype for t in task.adapter_spec.tensors])
    noised = apply_filters(delta, dp.filters())
    out = apply_filters(noised, [last])
    if isinstance(last, CompressFilter):
        assert feedback is not None
        feedback.save(task.round, last.residual(noised, out))
    else:
        tensors.check_against_spec(out, task.adapter_spec)
    return out


def _serve(cfg: SiteConfig, show_progress: bool, audit: AuditSink | None, ranks: Ranks) -> int:
    """Rank 0 (the only rank outside a launcher): the task loop that talks to the coordinator."""
    from site_agent.progress import RoundProgress

    # Everything that leaves the site, and every policy decision, goes to the site's own hash-chained audit log.
    audit = audit or AuditLog(Path(cfg.work_dir) / "audit.jsonl")
    guard = EgressGuard()
    # 1. Validate all private data and the site's policy before anything else: no training starts on a partly bad
    #    file, and no connection goes to a coordinator the policy does not trust.
    train_rows = load_jsonl(cfg.data.train)
    heldout_rows = load_sft(cfg.data.heldout) if cfg.data.heldout else []
    policy = load_policy(cfg.policy)
    if cfg.policy is None:
        log.warning("[Site] site=%s no policy.toml configured: accepting any mode, step count and upload size", cfg.name)
    try:
        check_coordinator(policy, cfg.coordinator, Path(cfg.tls.ca).read_bytes())
    except PolicyRefusal as e:
        audit.record("coordinator_refused", {"site": cfg.name, "rule": e.rule})
        raise
    signing_key = load_signing_key(cfg.tls.signing_key)
    ledger = PrivacyLedger(cfg.dp.ledger or Path(cfg.work_dir) / LEDGER_NAME)  # spent ε survives restarts
    base_check = _BaseModelCheck(cfg.base_model)
    trainer, trainer_mode, trainer_template = None, "", ""
    done = Path(cfg.work_dir) / DONE_MARKER
    if done.is_file():  # told DONE before a kill or a restart: the federation is over, nothing to join
        log.info("[Site] federation already done (%s); nothing to do -- remove that file to join a new federation "
                 "with this work_dir", done)
        if ranks.world > 1:  # the other ranks wait for rank 0's first round: tell them to leave too
            ranks.broadcast_bytes([])
        return 0
    client = CoordinatorClient(cfg, chunk_size=cfg.upload_chunk_bytes or codec.DEFAULT_CHUNK_SIZE)
    scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedbridge-heldout")  # step 7, beside the upload
    trained = 0
    beats = client.heartbeats(0, 0, "idle")  # alive for as long as the agent serves (see Heartbeats)
    try:
        # 2. Join: the coordinator reads our identity from the certificate.
        joined = client.join(AGENT_VERSION, cfg.lora_rank)
        log.info("[Site.Join] site=%s federation=%s", joined.site, joined.federation_id)
        beats.__enter__()
        last_round = 0
        while True:
            # 3. Long-poll for a task.
            resp = client.fetch_task(cfg.fetch_wait_ms)
            if resp.status == pb.TASK_STATUS_WAIT:
                continue
            task = resp.task
            if resp.status == pb.TASK_STATUS_TRAIN and task.round <= last_round:
                continue
            beats.working(task.round, "prepare")  # policy checks, loading the model, downloading the adapter
            # 4. Check the task against the site's policy (nothing trains on a refused task), then the base model:
            #    it must be exactly the one pinned by hash.
            if resp.status == pb.TASK_STATUS_TRAIN:
                try:
                    dp = resolve(cfg.dp, task.dp)
                except ValueError as e:
                    raise SiteRefusal(f"refusing task: {e}") from None
                try:
                    check_task(policy, task, len(train_rows), dp.noise_multiplier)
                    check_budget(policy, ledger, dp)  # DP: refuse before training once the budget would be exceeded
                except PolicyRefusal as e:
                    audit.record("task_refused", {"site": cfg.name, "round": task.round, "rule": e.rule,
                                                  "mode": task.training.mode})
                    raise
                if task.training.per_device_batch_size % ranks.world:
                    audit.record("task_refused", {"site": cfg.name, "round": task.round, "rule": "batch_per_rank",
                                                  "mode": task.training.mode})
                    raise SiteRefusal(f"refusing task: its batch of {task.training.per_device_batch_size} does not "
                                      f"divide over this site's {ranks.world} ranks; run the site on a number of "
                                      "ranks that divides it")
                audit.record("task_accepted", {"site": cfg.name, "round": task.round, "mode": task.training.mode,
                                               "max_steps": task.training.max_steps,
                                               "base_model_sha256": task.base_model_sha256,
                                               "chat_template_sha256": task.chat_template_sha256})
            base_check.verify(task.base_model_sha256)
            mode = task.training.mode or "sft"
            try:
                check_template_pin(task)
                if trainer is None:
                    os.makedirs(cfg.work_dir, exist_ok=True)
                    trainer = make_trainer(mode, cfg.base_model, cfg.data.train, cfg.work_dir, cfg.checkpoint_steps,
                                           cfg.deepspeed, task.chat_template, task.chat_template_sha256,
                                           cfg.device_map, world_size=ranks.world)
                    trainer_mode, trainer_template = mode, task.chat_template_sha256
                elif task.chat_template_sha256 != trainer_template:
                    raise TemplateRefusal("refusing task: the federation changed its chat template mid-run; "
                                          "restart the agent")
            except TemplateRefusal as e:  # audited like the policy's refusals: which rule, never any data
                audit.record("task_refused", {"site": cfg.name, "round": task.round, "rule": "chat_template",
                                              "reason": str(e)[:500]})
                raise
            global_bytes = client.download_adapter(task.round, task.global_adapter_sha256, task.global_adapter_size)
            global_state = global_adapter_state(task, global_bytes)
            residual_bytes = b""
            if task.base_residual_size:  # FedEx-LoRA: the federation folded a correction into the base weights
                residual_bytes = client.download_adapter(
                    task.round, task.base_residual_sha256, task.base_residual_size, pb.ARTIFACT_KIND_BASE_RESIDUAL)
            trainer.set_base_residual(tensors.decode_state(residual_bytes) if residual_bytes else {})
            if resp.status == pb.TASK_STATUS_DONE:
                # Durably first: once the final report is in, the coordinator may drain and exit, and a site killed
                # after that point must not restart into a Join that can never succeed (a restart loop).
                write_durable(Path(cfg.work_dir) / DONE_MARKER, json.dumps(
                    {"federation_id": task.federation_id, "rounds": task.total_rounds}).encode())
                _report_eval(client, trainer, task, global_state, heldout_rows, guard, audit, cfg.name)
                log.info("[Site] federation=%s done after %d rounds", task.federation_id, task.total_rounds)
                return trained
            if mode != trainer_mode:
                raise SiteRefusal("refusing task: the federation changed its training mode mid-run; restart the agent")
            # 5. Train locally (on a multi-rank site: every rank trains this round together, from the same bytes).
            if ranks.world > 1:
                ranks.broadcast_bytes([task.SerializeToString(), global_bytes, residual_bytes])
            beats.working(task.round, "train", task.training.max_steps)
            with RoundProgress(cfg.name, task.round, task.total_rounds, task.training.max_steps,
                               enabled=show_progress) as bar:
                result = trainer.train_round(task, global_state, lambda s, n, loss: (
                    beats.progress(s), bar.update(s, n, loss), _test_fault(beats.round, s)))
            beats.working(task.round, "upload")
            # 6. Only the adapter delta leaves: egress filters (clip -> DP noise -> cast to the wire dtype), encode,
            #    sign, upload.
            #    With [lora] compression the last filter encodes instead of casting, and adds the error-feedback
            #    residual of an earlier round; this round's residual is on disk before anything is sent.
            secure = secagg.fetch_settings(client).enabled
            if secure and task.adapter_spec.compression.encoding:
                raise SiteRefusal("refusing task: the adapter spec asks for compressed updates, but secure "
                                  "aggregation masks fixed-point values and cannot carry them; nothing was sent")
            delta = egress_delta(result.delta, dp, task, cfg.work_dir)
            payload = tensors.encode_state(delta)
            try:
                check_upload_size(policy, len(payload))
            except PolicyRefusal as e:
                audit.record("upload_refused", {"site": cfg.name, "round": task.round, "rule": e.rule})
                raise
            if policy.require_secure_aggregation and not secure:
                audit.record("upload_refused", {"site": cfg.name, "round": task.round,
                                                "rule": "require_secure_aggregation"})
                raise PolicyRefusal("require_secure_aggregation", "the coordinator does not run secure aggregation; "
                                    "the update was not sent")
            epsilon = 0.0
            if dp.noised:  # the ledger is written before the upload, so a crash can only over-count
                ledger.record(task.federation_id, task.round, dp, codec.sha256_hex(payload))
                epsilon = ledger.epsilon(policy.dp_delta)
            dp_delta = policy.dp_delta if dp.noised else 0.0
            env = codec.make_envelope(federation_id=task.federation_id, round=task.round, site=cfg.name,
                                      base_model_sha256=task.base_model_sha256, payload=payload,
                                      adapter_spec_sha256=task.adapter_spec.sha256, num_examples=result.num_examples,
                                      epsilon_spent=epsilon)
            env.dp_delta = dp_delta
            try:  # the egress guard sees the exact update bytes (under secure aggregation: before masking)
                guard.check_update(payload, env, task.adapter_spec)
            except EgressRefusal as e:
                audit.record("egress_refused", {"site": cfg.name, "round": task.round, "rule": e.rule,
                                                "reason": str(e)[:500]})
                raise SiteRefusal(str(e)) from None
            # 7. Off the critical path: a worker thread scores the round's incoming global adapter on our held-out
            #    split while the coordinator checks and stores the update (and, from the round's last site,
            #    aggregates): it starts once the last byte is handed to the transport (before a masked upload), so
            #    it does not hold the GIL against the stream. The model is free for it: the delta was copied out.
            #    Scored after the upload instead, the last site's evaluation held up its next round's start by
            #    tens of milliseconds every round. It is waited for on every way out of the upload, so a next round
            #    never trains a model being scored.
            scoring = _Scoring(scorer, trainer, task, global_state, heldout_rows)
            try:
                if secure:  # only the masked update leaves (site_agent/egress/secagg.py)
                    scoring.start()
                    sent = secagg.secure_upload(client, task, cfg.name, signing_key, Path(cfg.tls.ca).read_bytes(),
                                                delta, result.num_examples, epsilon=epsilon, dp_delta=dp_delta)
                    if sent is None:  # late for the roster or dropped: nothing about this update left the site
                        audit.record("secagg_excluded", {"site": cfg.name, "round": task.round})
                        last_round = task.round
                        continue
                    env, payload = sent
                    audit.record("update_sent", {"site": cfg.name, "round": task.round, "bytes": len(payload),
                                                 "payload_sha256": env.payload_sha256, "nonce": env.nonce.hex(),
                                                 "epsilon_spent": env.epsilon_spent, "num_examples": env.num_examples,
                                                 "secure_aggregation": True})
                else:
                    audit.record("update_sent", {"site": cfg.name, "round": task.round, "bytes": len(payload),
                                                 "payload_sha256": env.payload_sha256, "nonce": env.nonce.hex(),
                                                 "epsilon_spent": env.epsilon_spent, "num_examples": env.num_examples})
                    _test_upload_delay(task.round)
                    try:
                        client.upload(codec.sign_envelope(env, signing_key), env, payload,
                                      on_progress=scoring.start_once_sent(len(payload)))
                    except LateUpdateRefused as e:  # the round closed without us (deadline); go on with the next one
                        log.warning("[Site.UploadUpdate] round=%d site=%s refused as late: %s", task.round, cfg.name, e)
                        audit.record("update_refused_late", {"site": cfg.name, "round": task.round,
                                                             "payload_sha256": env.payload_sha256})
                        last_round = task.round
                        continue
            finally:
                scoring.wait()
            log.info("[Site.UploadUpdate] round=%d site=%s bytes=%d epsilon=%.4g accepted", task.round, cfg.name,
                     len(payload), epsilon)
            audit.record("update_uploaded", {"site": cfg.name, "round": task.round, "bytes": len(payload),
                                             "payload_sha256": env.payload_sha256, "epsilon": epsilon,
                                             "dp_noise_multiplier": dp.noise_multiplier})
            _send_metrics(client, guard, audit, cfg.name, task.round, "train", {
                "loss": result.train_loss, "train_time_s": result.train_time_s, "round_time_s": result.round_time_s,
                "tokens": float(result.tokens),
                "tokens_per_s": result.tokens / max(result.train_time_s, 1e-9), "upload_bytes": float(len(payload)),
                "steps": float(result.steps),
            }, result.num_examples)
            trained += 1
            last_round = task.round
            beats.working(task.round, "eval")
            _report_eval(client, trainer, task, global_state, heldout_rows, guard, audit, cfg.name, scoring)
            beats.working(task.round, "idle")
    except Exception as e:
        # A site that fails tells the coordinator (one sanitized line, no data), so the admin sees it failed and
        # the round does not wait for it; the site's own audit log records exactly what was sent.
        if client.report_error(beats.round, beats.phase, e):
            audit.record("error_reported", {"site": cfg.name, "round": beats.round, "phase": beats.phase,
                                            "error": ": ".join(x for x in error_summary(e) if x)})
        raise
    finally:
        scorer.shutdown(wait=True)
        beats.__exit__(None, None, None)
        client.close()
        if ranks.world > 1:  # done, refused or failed: the other ranks leave with rank 0
            ranks.broadcast_bytes([])


def _send_metrics(client: CoordinatorClient, guard: EgressGuard, audit: AuditSink, site: str, round: int, phase: str,
                  metrics: dict[str, float], num_examples: int) -> None:
    """Egress-guard, audit, then send a metrics report."""
    try:
        guard.check_metrics(metrics)
    except EgressRefusal as e:
        audit.record("egress_refused", {"site": site, "round": round, "rule": e.rule, "reason": str(e)[:500]})
        raise SiteRefusal(str(e)) from None
    audit.record("metrics_sent", {"site": site, "round": round, "phase": phase, "num_examples": num_examples,
                                  "metrics": {k: float(v) for k, v in sorted(metrics.items())}})  # type: ignore[dict-item]
    client.report_metrics(round, phase, metrics, num_examples)


def _score_heldout(trainer, task: pb.Task, state: dict[str, torch.Tensor],  # type: ignore[no-untyped-def]
                   heldout_rows: list[dict]) -> tuple[dict[str, float], int]:
    """The held-out metrics of ``state`` (the round's incoming global adapter) and the rows they cover; nothing to
    score without held-out rows."""
    if not heldout_rows:
        return {}, 0
    loss, tokens = trainer.evaluate(task.adapter_spec, state, heldout_rows)
    metrics = {"loss": loss, "tokens": float(tokens)}
    if is_mcq(heldout_rows):  # evaluate() left the global adapter loaded; only the fraction correct leaves
        metrics["accuracy"] = mcq_accuracy(trainer.model, trainer.tokenizer, heldout_rows)
    return metrics, len(heldout_rows)


class _Scoring:
    """The held-out score of a round's incoming global adapter, computed once in ``pool``'s worker thread: started
    by the first :meth:`start` (from any thread; the upload's progress calls it), awaited by :meth:`wait`, and
    :meth:`result` starts it if nothing did."""

    def __init__(self, pool: ThreadPoolExecutor, trainer, task: pb.Task,  # type: ignore[no-untyped-def]
                 state: dict[str, torch.Tensor], heldout_rows: list[dict]) -> None:
        self._pool, self._args = pool, (trainer, task, state, heldout_rows)
        self._lock = threading.Lock()
        self._future: Future[tuple[dict[str, float], int]] | None = None

    def start(self) -> None:
        with self._lock:
            if self._future is None:
                self._future = self._pool.submit(_score_heldout, *self._args)

    def start_once_sent(self, size: int) -> Callable[[int], None]:
        """An upload progress callback that starts the score once all ``size`` bytes are handed over."""
        return lambda sent: self.start() if sent >= size else None

    def wait(self) -> None:
        """Until a started score is done (its error, if any, is kept for :meth:`result`)."""
        with self._lock:
            future = self._future
        if future is not None:
            wait([future])

    def result(self) -> tuple[dict[str, float], int]:
        self.start()
        assert self._future is not None
        return self._future.result()


def _report_eval(client: CoordinatorClient, trainer, task: pb.Task, state: dict[str, torch.Tensor],  # type: ignore[no-untyped-def]
                 heldout_rows: list[dict], guard: EgressGuard | None = None, audit: AuditSink | None = None,
                 site: str = "", scored: _Scoring | None = None) -> None:
    """Score ``state`` on the held-out rows (or take ``scored``, that score computed already) and report it.

    Without held-out rows the report is empty: it still tells a coordinator waiting to exit (exit_when_done) that
    this site has its DONE and is leaving, so it need not wait out its drain timeout for a report never coming.
    """
    metrics, rows = scored.result() if scored is not None else _score_heldout(trainer, task, state, heldout_rows)
    _send_metrics(client, guard or EgressGuard(), audit or LogAuditSink(), site, task.round, "eval_global", metrics,
                  rows)
    if metrics:
        log.info("[Site.Eval] round=%d heldout_loss=%.4f accuracy=%s", task.round, metrics["loss"],
                 f"{metrics['accuracy']:.4f}" if "accuracy" in metrics else "n/a")
