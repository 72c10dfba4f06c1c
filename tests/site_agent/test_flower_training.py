"""The Flower ClientApp's handlers train and score what the same site does over fedbridge's own transport.

The ServerApp's strategy builds the real train and evaluate messages; the ClientApp's handlers run in this process
on the tiny base. The references are the site trainer fed as the task loop feeds it.

- Every preference mode (DPO, KTO, ORPO, SimPO; SFT runs in the Flower deployment test): the reply's delta is the
  trainer's delta, bit for bit.
- Mixed ranks: at node config ``lora-rank = 2`` the handler projects the full-rank adapter with the rule the message
  names. The reference is what the coordinator's :class:`Adapters` sends a site that declared rank 2 at Join.
- Evaluate: a site with a held-out split scores the message's adapter and sends back only the loss, the token count
  and its weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from coordinator.config import LoraSpec  # noqa: E402
from coordinator.flower.strategy import FedbridgeStrategy  # noqa: E402
from coordinator.rounds.adapter import init_adapter  # noqa: E402
from coordinator.rounds.adapters import Adapters  # noqa: E402
from coordinator.rounds.store import Store  # noqa: E402
from fedcommon import flowerwire as fw  # noqa: E402
from fedcommon import tensors  # noqa: E402
from fedcommon.manifest import Manifest  # noqa: E402
from protos.fedbridge.v1 import federation_service_pb2 as pb  # noqa: E402
from site_agent.agent import SiteRefusal, egress_delta, make_trainer  # noqa: E402
from site_agent.egress.dp import SiteDpConfig, resolve  # noqa: E402
from site_agent.flower import clientapp  # noqa: E402
from site_agent.training.data import load_sft  # noqa: E402
from strategies.registry import SITE_RANK_RULES  # noqa: E402

ROWS = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                      {"role": "assistant", "content": str(2 * i)}]} for i in range(8)]
PAIRS = [{"prompt": f"what is {i} plus {i}?", "chosen": str(2 * i), "rejected": "I do not know."} for i in range(8)]
KTO = [{"prompt": f"what is {i} plus {i}?", "completion": str(2 * i) if i % 2 else "no idea", "label": bool(i % 2)}
       for i in range(8)]


class OneNodeGrid:
    def get_node_ids(self) -> list[int]:
        return [7]


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Messages are stamped with the run of the process (set by Flower's app runner in a real deployment).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(clientapp, "_SITES", {})  # each test builds its own site state
    yield


def _federation(tiny_model_dir: Path, tmp_path: Path, rule: str, mode: str = "sft",  # type: ignore[no-untyped-def]
                rows: list[dict] = ROWS):
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    # A global adapter that is not the initial one (B = 0 there would make a projection of B trivially zero).
    g = torch.Generator().manual_seed(3)
    global_state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in init.state.items()}
    task = pb.Task(federation_id="f", round=1, total_rounds=1, base_model_sha256=Manifest.of_dir(tiny_model_dir).sha256,
                   adapter_spec=init.spec, training=pb.TrainingConfig(mode=mode, max_steps=2, learning_rate=1e-2,
                                                                      per_device_batch_size=4, max_length=64, seed=0,
                                                                      beta=0.2))
    strategy = FedbridgeStrategy(rule, task_for_round=lambda r: task, min_train_nodes=1, min_available_nodes=1,
                                 fraction_evaluate=1.0, min_evaluate_nodes=1)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return init, global_state, task, strategy


def _context(tiny_model_dir: Path, tmp_path: Path, rank: int = 0) -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-path": str(tmp_path / "train.jsonl"), "lora-rank": rank},
                   state=RecordDict(), run_config={"base-model": str(tiny_model_dir), "work-dir": str(tmp_path / "fl")})


def _native_delta(tiny_model_dir: Path, tmp_path: Path, task: pb.Task,  # type: ignore[no-untyped-def]
                  global_state: dict[str, torch.Tensor]):
    trainer = make_trainer(task.training.mode, tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "native")
    return egress_delta(trainer.train_round(task, global_state).delta, resolve(SiteDpConfig(), task.dp), task,
                        tmp_path / "native")


# ORPO and SimPO share TRL's CPO trainer path: they run with -m slow.
@pytest.mark.parametrize("mode,rows", [("dpo", PAIRS), ("kto", KTO), pytest.param("orpo", PAIRS, marks=pytest.mark.slow),
                                       pytest.param("simpo", PAIRS, marks=pytest.mark.slow)],
                         ids=["dpo", "kto", "orpo", "simpo"])
def test_each_preference_mode_trains_the_task_loops_delta(tiny_model_dir: Path, tmp_path: Path, mode: str,
                                                          rows: list[dict]) -> None:
    # Prepare
    init, global_state, task, strategy = _federation(tiny_model_dir, tmp_path, "fedavg", mode, rows)
    [msg] = strategy.configure_train(1, fw.state_record(global_state), ConfigRecord(), OneNodeGrid())
    expected = _native_delta(tiny_model_dir, tmp_path, task, global_state)

    # Execute
    reply = clientapp.train(msg, _context(tiny_model_dir, tmp_path))

    # Assert: the same delta as the task loop's trainer, of the federation's spec; the site's audit log has it
    delta = fw.record_state(reply.content.array_records[fw.ADAPTER_RECORD])
    tensors.check_against_spec(delta, init.spec)
    assert delta.keys() == expected.keys() and all(torch.equal(delta[k], expected[k]) for k in delta)
    assert any(not torch.equal(delta[k], torch.zeros_like(delta[k])) for k in delta)
    events = [json.loads(line)["event"] for line in (tmp_path / "fl" / "train" / "audit.jsonl").read_text().splitlines()]
    assert events == ["task_accepted", "update_sent"]


def test_evaluate_scores_the_messages_adapter_and_sends_only_aggregates(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a site with a held-out split (site.toml), the ServerApp's evaluate message
    init, global_state, task, strategy = _federation(tiny_model_dir, tmp_path, "fedavg")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    toml = tmp_path / "site.toml"
    toml.write_text(f'name = "site-e"\ncoordinator = "127.0.0.1:1"\nbase_model = "{tiny_model_dir}"\n'
                    f'work_dir = "{tmp_path / "work"}"\n[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k"\n'
                    f'signing_key = "s"\n[data]\ntrain = "{tmp_path / "train.jsonl"}"\nheldout = "{heldout}"\n')
    ctx = Context(run_id=1, node_id=7, node_config={"site-config": str(toml)}, state=RecordDict(), run_config={})
    [msg] = strategy.configure_evaluate(1, fw.state_record(global_state), ConfigRecord(), OneNodeGrid())
    trainer = make_trainer("sft", tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "native")
    want_loss, want_tokens = trainer.evaluate(init.spec, global_state, load_sft(heldout))

    # Execute
    reply = clientapp.evaluate(msg, ctx)

    # Assert: the trainer's loss on the held-out rows, weighted by their count; nothing else leaves
    metrics = dict(reply.content.metric_records[fw.METRICS_RECORD])
    assert metrics == {fw.WEIGHT_KEY: 3, "loss": pytest.approx(float(want_loss), rel=1e-6),
                       "tokens": float(want_tokens)}
    assert not reply.content.array_records
    assert dict(strategy.aggregate_evaluate(1, [reply]))["loss"] == pytest.approx(float(want_loss), rel=1e-6)


@pytest.mark.parametrize("rule", ["hetlora", "flexlora"])
def test_a_lower_rank_site_trains_what_fedbridges_transport_gives_it(tiny_model_dir: Path, tmp_path: Path,
                                                                     rule: str) -> None:
    # Prepare: the message the ServerApp sends; the coordinator's view of a rank-2 site of the same federation
    init, global_state, task, strategy = _federation(tiny_model_dir, tmp_path, rule)
    [msg] = strategy.configure_train(1, fw.state_record(global_state), ConfigRecord(), OneNodeGrid())
    store = Store(tmp_path / "coordinator")
    store.put_adapter(1, tensors.encode_state(global_state))
    adapters = Adapters(store, init.spec, init.state, SITE_RANK_RULES[rule])
    adapters.remember_rank("train", 2)
    native_spec = adapters.spec_for("train")
    native_global = tensors.decode_state(adapters.site_adapter_bytes("train", 1))
    native_task = pb.Task()
    native_task.CopyFrom(task)
    native_task.adapter_spec.CopyFrom(native_spec)
    expected = _native_delta(tiny_model_dir, tmp_path, native_task, native_global)

    # Execute: the ClientApp's train handler at lora-rank 2
    reply = clientapp.train(msg, _context(tiny_model_dir, tmp_path, 2))

    # Assert: the rank-2 spec, the same delta bit for bit, the rank reported; the rule aggregates it at its rank
    assert native_spec.rank == 2 and native_spec.sha256 != init.spec.sha256
    delta = fw.record_state(reply.content.array_records[fw.ADAPTER_RECORD])
    tensors.check_against_spec(delta, native_spec)
    assert delta.keys() == expected.keys() and all(torch.equal(delta[k], expected[k]) for k in delta)
    assert reply.content.metric_records[fw.METRICS_RECORD][fw.RANK_KEY] == 2
    arrays, _ = strategy.aggregate_train(1, [reply])
    merged = fw.record_state(arrays)
    assert {k: tuple(v.shape) for k, v in merged.items()} == {k: tuple(v.shape) for k, v in global_state.items()}
    assert strategy.last_info  # the mixed-rank rule ran (and reported), not a shape error


def test_a_lower_rank_under_a_rule_without_mixed_ranks_is_refused_before_training(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    _, global_state, _, strategy = _federation(tiny_model_dir, tmp_path, "fedavg")
    [msg] = strategy.configure_train(1, fw.state_record(global_state), ConfigRecord(), OneNodeGrid())
    with pytest.raises(SiteRefusal, match=r"rank 4 with strategy 'fedavg'; mixed ranks need one of \['flexlora', "
                                          r"'hetlora'\]"):
        clientapp.train(msg, _context(tiny_model_dir, tmp_path, 2))
    with pytest.raises(SiteRefusal, match=r"LoRA rank 6: this federation trains rank 4; a site may train 1\.\.4"):
        clientapp.train(msg, _context(tiny_model_dir, tmp_path, 6))
    assert not (tmp_path / "fl" / "train" / "audit.jsonl").exists() or "update_sent" not in (
        tmp_path / "fl" / "train" / "audit.jsonl").read_text()


def test_a_bad_rank_in_the_node_or_run_config_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "site-1.jsonl").write_text("{}\n")
    run = {"partition-dir": str(tmp_path), "base-model": "/m"}

    def ctx(node: dict, extra: dict) -> Context:
        return Context(run_id=1, node_id=2, node_config=node, state=RecordDict(), run_config={**run, **extra})

    assert clientapp.site_from_context(ctx({"partition-id": 1}, {"lora-ranks": "8, 4,2"})).lora_rank == 4
    assert clientapp.site_from_context(ctx({"partition-id": 1}, {})).lora_rank == 0
    with pytest.raises(ValueError, match="run config 'lora-ranks': 'x' is not an integer"):
        clientapp.site_from_context(ctx({"partition-id": 1}, {"lora-ranks": "8,x"}))
    with pytest.raises(ValueError, match="node config 'lora-rank': must be >= 0, got -1"):
        clientapp.site_from_context(ctx({"partition-id": 1, "lora-rank": -1}, {}))
