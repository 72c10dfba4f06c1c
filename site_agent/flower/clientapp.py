"""fedbridge's site as a Flower ``ClientApp``: train one round of the task a :mod:`coordinator.flower` ServerApp sends.

Where the site's data and settings come from (first match):

- ``--node-config "site-config='/path/site.toml'"``: the site's own ``site.toml`` (its base model, data, work dir,
  ``policy.toml``, ``[dp]``, threads, checkpointing). Its ``coordinator`` and ``[tls]`` fields are not used here:
  Flower's SuperNode holds the connection.
- ``--node-config "data-path='/path/train.jsonl'"`` (a deployment without a ``site.toml``) or, in simulation,
  ``partition-id`` with the run config's ``partition-dir`` (``site-{partition-id}.jsonl`` in it); the base model is
  then the run config's ``base-model`` and the work dir ``work-dir`` (default: a folder under the system's temp dir),
  and the site's LoRA rank node config ``lora-rank`` (in simulation: run config ``lora-ranks``, cycled by partition).

Under a mixed-rank rule (HetLoRA, FlexLoRA) a site below the federation's rank projects the global adapter to its
own rank itself (:func:`fedcommon.siterank.for_site`, as fedbridge's coordinator does before it sends), because
Flower's ServerApp sends every node the same full-rank message.

Each train message carries the fedbridge task (training config, adapter spec, base-model hash, chat template pin),
the global adapter and, under FedEx-LoRA, the base residual, all as safetensors (:mod:`fedcommon.flowerwire`). The
site checks the task against its policy and the base model against the pinned hash, trains with the same trainer the
task loop uses, passes the delta through the same egress filters and guard, records DP releases in its ledger, and
replies with the delta and its weight. A refusal raises (Flower returns it to the ServerApp as the node's error).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcommon import flowerwire as fw
from fedcommon import siterank, tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

log = logging.getLogger(__name__)
app = ClientApp()


@dataclass(frozen=True)
class FlowerSite:
    """What the ClientApp needs of a site (the subset of ``site.toml`` that is not the connection).

    Attributes:
        name: The site's name (reported with each reply, so the ServerApp orders updates as the coordinator does).
        base_model: Local base model directory (verified against the task's manifest hash).
        train: Training file.
        heldout: Held-out file scored by the evaluate handler (None: the handler reports nothing).
        work_dir: Scratch space, the privacy ledger and the error-feedback store.
        policy: ``policy.toml`` (None: the permissive defaults).
        threads: Torch CPU threads (0: torch's default).
        checkpoint_steps: Step checkpoints within a round (0: off).
        device_map: transformers ``device_map`` on CUDA ("" : one device).
        dp: The site's own ``[dp]`` settings.
    """

    name: str
    base_model: Path
    train: Path
    heldout: Path | None
    work_dir: Path
    policy: Path | None = None
    threads: int = 0
    checkpoint_steps: int = 0
    device_map: str = ""
    dp: Any = None
    lora_rank: int = 0


def site_from_context(context: Context) -> FlowerSite:
    """The site this node serves, from its node config (``site-config``, ``data-path`` or ``partition-id``).

    Raises:
        ValueError: None of the keys is set, or a file it names is missing (the message names the key and path).
    """
    from site_agent.config import load_site_config
    from site_agent.egress.dp import SiteDpConfig

    node, run = dict(context.node_config), dict(context.run_config)
    if "site-config" in node:
        cfg = load_site_config(str(node["site-config"]))
        return FlowerSite(cfg.name, cfg.base_model, cfg.data.train, cfg.data.heldout, cfg.work_dir, cfg.policy,
                          cfg.threads, cfg.checkpoint_steps, cfg.device_map, cfg.dp, cfg.lora_rank)
    if "data-path" in node:
        train, name = Path(str(node["data-path"])), str(node.get("site-name", Path(str(node["data-path"])).stem))
    elif "partition-id" in node:
        if "partition-dir" not in run:
            raise ValueError("run config 'partition-dir' is not set; a simulation node reads "
                             "partition-dir/site-{partition-id}.jsonl")
        name = f"site-{int(node['partition-id'])}"
        train = Path(str(run["partition-dir"])) / f"{name}.jsonl"
    else:
        raise ValueError("node config: set 'site-config' (the site's site.toml) or 'data-path' (its training file); "
                         "in simulation, 'partition-id' with run config 'partition-dir'")
    if not train.is_file():
        raise ValueError(f"node config: training file {train} does not exist")
    if "base-model" not in run:
        raise ValueError("run config 'base-model' is not set (the local base model directory of every node)")
    work = Path(str(run.get("work-dir", Path(tempfile.gettempdir()) / "fedbridge-flower"))) / name
    return FlowerSite(name, Path(str(run["base-model"])), train, None, work, dp=SiteDpConfig(),
                      threads=int(run.get("threads", 0)), lora_rank=_node_rank(node, run))


def _node_rank(node: dict[str, Any], run: dict[str, Any]) -> int:
    """The LoRA rank a node without a ``site.toml`` trains: node config ``lora-rank``, or in simulation the run
    config's ``lora-ranks`` (comma-separated, partition ``i`` takes entry ``i mod len``); 0: the federation's rank."""
    if "lora-rank" in node:
        raw, where = node["lora-rank"], "node config 'lora-rank'"
    elif "lora-ranks" in run and "partition-id" in node:
        ranks = [r.strip() for r in str(run["lora-ranks"]).split(",") if r.strip()]
        if not ranks:
            raise ValueError("run config 'lora-ranks': empty; give ranks like '8,4,2' or leave it out")
        raw, where = ranks[int(node["partition-id"]) % len(ranks)], "run config 'lora-ranks'"
    else:
        return 0
    try:
        rank = int(str(raw))
    except ValueError:
        raise ValueError(f"{where}: {raw!r} is not an integer") from None
    if rank < 0:
        raise ValueError(f"{where}: must be >= 0, got {rank}")
    return rank


class _SiteState:
    """One site's long-lived pieces in this process: the trainer (base model loaded once), the base check, the
    ledger. A Flower SuperNode may start a new ClientApp process per message; a simulation keeps one per actor."""

    def __init__(self, site: FlowerSite) -> None:
        from site_agent.agent import _BaseModelCheck
        from site_agent.egress.dp import LEDGER_NAME, PrivacyLedger
        from site_agent.policy import load_policy
        from site_agent.training.data import load_jsonl

        self.site = site
        self.rows = load_jsonl(site.train)  # validated in full before anything trains
        self.policy = load_policy(site.policy)
        self.ledger = PrivacyLedger((site.dp.ledger if site.dp is not None and site.dp.ledger else None)
                                    or Path(site.work_dir) / LEDGER_NAME)
        self.base_check = _BaseModelCheck(site.base_model)
        # The site's own hash-chained audit log, as under the task loop: every accepted task and every update
        # that left, with its hash (Flower's transport keeps no record a site could check).
        from fedcommon.auditlog import AuditLog

        self.audit = AuditLog(Path(site.work_dir) / "audit.jsonl")
        self.trainer: Any = None
        self.trainer_key: tuple[str, str] = ("", "")
        self.lock = threading.Lock()

    def trainer_for(self, task: pb.Task) -> Any:
        from site_agent.agent import check_template_pin, make_trainer

        check_template_pin(task)
        key = (task.training.mode or "sft", task.chat_template_sha256)
        if self.trainer is None or self.trainer_key != key:
            os.makedirs(self.site.work_dir, exist_ok=True)
            self.trainer = make_trainer(key[0], self.site.base_model, self.site.train, self.site.work_dir,
                                        self.site.checkpoint_steps, None, task.chat_template,
                                        task.chat_template_sha256, self.site.device_map)
            self.trainer_key = key
        return self.trainer


_SITES: dict[FlowerSite, _SiteState] = {}
_SITES_LOCK = threading.Lock()


def _state(context: Context) -> _SiteState:
    site = site_from_context(context)
    with _SITES_LOCK:
        if site not in _SITES:
            if site.threads:
                import torch

                torch.set_num_threads(site.threads)
            _SITES[site] = _SiteState(site)
        return _SITES[site]


def train_round(state: _SiteState, task: pb.Task, global_state: dict[str, Any],
                residual: dict[str, Any], rule: str = "") -> tuple[dict[str, Any], Any, float]:
    """Check, train and filter one round, as the task loop does. Returns (delta as sent, RoundResult, ε spent).

    A site whose rank is below the task's (``lora_rank``) trains the global adapter projected to its rank by
    ``rule`` (the ServerApp's strategy), with the same spec fedbridge's coordinator would send it; ``task`` is
    changed in place to carry that spec.

    Raises:
        PolicyRefusal: The task is outside the site's policy (or the DP budget would be exceeded).
        SiteRefusal: Base model mismatch, unsuitable data, template refused, or the egress guard refused.
    """
    from site_agent.agent import SiteRefusal, egress_delta
    from site_agent.egress.dp import check_budget, resolve
    from site_agent.egress.guard import EgressGuard, EgressRefusal
    from site_agent.policy import check_task, check_upload_size

    site = state.site
    try:
        dp = resolve(site.dp, task.dp)
    except ValueError as e:
        raise SiteRefusal(f"refusing task: {e}") from None
    if site.lora_rank and site.lora_rank != task.adapter_spec.rank:  # HetLoRA / FlexLoRA: train the site's own rank
        try:
            spec, global_state = siterank.for_site(rule, task.adapter_spec, global_state, site.lora_rank)
        except ValueError as e:
            raise SiteRefusal(f"refusing task: {e}") from None
        task.adapter_spec.CopyFrom(spec)
    check_task(state.policy, task, len(state.rows), dp.noise_multiplier)
    check_budget(state.policy, state.ledger, dp)
    state.base_check.verify(task.base_model_sha256)
    state.audit.record("task_accepted", {"site": site.name, "round": task.round, "mode": task.training.mode,
                                         "max_steps": task.training.max_steps, "transport": "flower",
                                         "base_model_sha256": task.base_model_sha256,
                                         "chat_template_sha256": task.chat_template_sha256})
    trainer = state.trainer_for(task)
    trainer.set_base_residual(residual)
    result = trainer.train_round(task, global_state)
    delta = egress_delta(result.delta, dp, task, site.work_dir)
    payload = tensors.encode_state(delta)
    check_upload_size(state.policy, len(payload))
    epsilon = 0.0
    if dp.noised:  # recorded before the reply leaves, so a crash can only over-count
        state.ledger.record(task.federation_id, task.round, dp, codec.sha256_hex(payload))
        epsilon = state.ledger.epsilon(state.policy.dp_delta)
    env = codec.make_envelope(federation_id=task.federation_id, round=task.round, site=site.name,
                              base_model_sha256=task.base_model_sha256, payload=payload,
                              adapter_spec_sha256=task.adapter_spec.sha256, num_examples=result.num_examples,
                              epsilon_spent=epsilon)
    try:
        EgressGuard().check_update(payload, env, task.adapter_spec)
    except EgressRefusal as e:
        state.audit.record("egress_refused", {"site": site.name, "round": task.round, "rule": e.rule,
                                              "reason": str(e)[:500]})
        raise SiteRefusal(str(e)) from None
    state.audit.record("update_sent", {"site": site.name, "round": task.round, "bytes": len(payload),
                                       "payload_sha256": env.payload_sha256, "epsilon_spent": epsilon,
                                       "num_examples": result.num_examples, "transport": "flower"})
    return tensors.decode_state(payload), result, epsilon


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the round the message carries; reply with the delta (safetensors) and its weight."""
    from site_agent.egress.guard import EgressGuard

    state = _state(context)
    config = msg.content.config_records[fw.CONFIG_RECORD]
    task = fw.config_task(config)
    global_state = fw.record_state(msg.content.array_records[fw.ADAPTER_RECORD], fw.ADAPTER_RECORD)
    residual = (fw.record_state(msg.content.array_records[fw.RESIDUAL_RECORD], fw.RESIDUAL_RECORD)
                if fw.RESIDUAL_RECORD in msg.content.array_records else {})
    with state.lock:
        delta, result, epsilon = train_round(state, task, global_state, residual, str(config.get(fw.RULE_KEY, "")))
    metrics = {"loss": result.train_loss, "steps": float(result.steps), "epsilon_spent": epsilon}
    EgressGuard().check_metrics(metrics)  # only allow-listed aggregate numbers leave
    log.info("[Site.Flower] round=%d site=%s trained steps=%d", task.round, state.site.name, result.steps)
    return Message(RecordDict({
        fw.ADAPTER_RECORD: fw.state_record(delta),
        fw.METRICS_RECORD: MetricRecord({fw.WEIGHT_KEY: result.num_examples, fw.RANK_KEY: task.adapter_spec.rank,
                                         **metrics}),
        fw.CONFIG_RECORD: _site_record(state.site.name),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the message's global adapter on the site's held-out split (only the loss and its weight leave)."""
    from site_agent.egress.guard import EgressGuard
    from site_agent.training.data import load_sft

    state = _state(context)
    task = fw.config_task(msg.content.config_records[fw.CONFIG_RECORD])
    metrics: dict[str, float] = {}
    n = 0
    if state.site.heldout is not None:
        rows = load_sft(state.site.heldout)
        global_state = fw.record_state(msg.content.array_records[fw.ADAPTER_RECORD], fw.ADAPTER_RECORD)
        residual = (fw.record_state(msg.content.array_records[fw.RESIDUAL_RECORD], fw.RESIDUAL_RECORD)
                    if fw.RESIDUAL_RECORD in msg.content.array_records else {})
        with state.lock:
            state.base_check.verify(task.base_model_sha256)
            trainer = state.trainer_for(task)
            trainer.set_base_residual(residual)
            loss, tokens = trainer.evaluate(task.adapter_spec, global_state, rows)
        metrics, n = {"loss": float(loss), "tokens": float(tokens)}, len(rows)
    EgressGuard().check_metrics(metrics)
    return Message(RecordDict({fw.METRICS_RECORD: MetricRecord({fw.WEIGHT_KEY: n, **metrics}),
                               fw.CONFIG_RECORD: _site_record(state.site.name)}), reply_to=msg)


def _site_record(name: str) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({"site": name})
