"""Mixed LoRA ranks over Flower: a lower-rank site trains exactly what it trains over fedbridge's own transport.

The ServerApp's strategy builds the real train messages (one full-rank adapter and spec for every node); the
ClientApp's train handler, at node config ``lora-rank = 2``, projects the adapter with the rule the message names and
trains. The reference is the same site over fedbridge's transport: the coordinator's :class:`Adapters` projects the
stored global adapter to the rank the site declared at Join and builds its spec, and the site trainer trains that.
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
from strategies.registry import SITE_RANK_RULES  # noqa: E402

ROWS = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                      {"role": "assistant", "content": str(2 * i)}]} for i in range(8)]


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


def _federation(tiny_model_dir: Path, tmp_path: Path, rule: str):  # type: ignore[no-untyped-def]
    init = init_adapter(tiny_model_dir, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")))
    # A global adapter that is not the initial one (B = 0 there would make a projection of B trivially zero).
    g = torch.Generator().manual_seed(3)
    global_state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in init.state.items()}
    task = pb.Task(federation_id="f", round=1, total_rounds=1, base_model_sha256=Manifest.of_dir(tiny_model_dir).sha256,
                   adapter_spec=init.spec, training=pb.TrainingConfig(mode="sft", max_steps=2, learning_rate=1e-2,
                                                                      per_device_batch_size=4, max_length=64, seed=0))
    strategy = FedbridgeStrategy(rule, task_for_round=lambda r: task, min_train_nodes=1, min_available_nodes=1)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return init, global_state, task, strategy


def _context(tiny_model_dir: Path, tmp_path: Path, rank: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-path": str(tmp_path / "train.jsonl"), "lora-rank": rank},
                   state=RecordDict(), run_config={"base-model": str(tiny_model_dir), "work-dir": str(tmp_path / "fl")})


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
    trainer = make_trainer("sft", tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "native")
    expected = egress_delta(trainer.train_round(native_task, native_global).delta,
                            resolve(SiteDpConfig(), native_task.dp), native_task, tmp_path / "native")

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
