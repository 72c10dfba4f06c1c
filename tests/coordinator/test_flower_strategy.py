"""FedbridgeStrategy on arrays: Flower's sampling, fedbridge's aggregation (the strategies/ rule, bit for bit)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from coordinator.flower.strategy import FedbridgeStrategy  # noqa: E402
from coordinator.rounds.adapter import add_residual  # noqa: E402
from fedcommon import flowerwire as fw  # noqa: E402
from protos.fedbridge.v1 import federation_service_pb2 as pb  # noqa: E402
from strategies.lora import truncate_rank  # noqa: E402
from strategies.registry import build_strategy  # noqa: E402
from strategies.types import AggregationError, ClientUpdate  # noqa: E402

MODULES = ("model.layers.0.q_proj", "model.layers.0.v_proj")


class FakeGrid:
    """The one Grid method Flower's sampling calls."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture(autouse=True)
def _run_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Messages are stamped with the run of the process (set by Flower's app runner in a real deployment).
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield


def _state(rank: int, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[f"base_model.model.{m}.lora_A.weight"] = scale * torch.randn(rank, 6, generator=g)
        out[f"base_model.model.{m}.lora_B.weight"] = scale * torch.randn(5, rank, generator=g)
    return out


def _sent(strategy: FedbridgeStrategy, round: int, global_state: dict[str, torch.Tensor], nodes: list[int]) -> list[Message]:
    return list(strategy.configure_train(round, fw.state_record(global_state), ConfigRecord(), FakeGrid(nodes)))


def _reply(to: Message, site: str, delta: dict[str, torch.Tensor], weight: int, rank: int | None = None) -> Message:
    metrics: dict[str, int | float] = {fw.WEIGHT_KEY: weight, "loss": 1.0}
    if rank is not None:
        metrics[fw.RANK_KEY] = rank
    return Message(RecordDict({fw.ADAPTER_RECORD: fw.state_record(delta), fw.METRICS_RECORD: MetricRecord(metrics),
                               fw.CONFIG_RECORD: ConfigRecord({"site": site})}), reply_to=to)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("rule,params", [("fedavg", {}), ("fedadam", {"eta": 0.05}), ("median", {})])
def test_aggregation_is_the_strategies_rule(rule: str, params: dict) -> None:
    strategy = FedbridgeStrategy(rule, params, min_train_nodes=3, min_available_nodes=3)
    g = _state(4, 0)
    deltas = {"site-c": (_state(4, 3, 0.1), 30), "site-a": (_state(4, 1, 0.1), 10), "site-b": (_state(4, 2, 0.1), 20)}
    sent = _sent(strategy, 1, g, [11, 12, 13])
    replies = [_reply(m, site, d, w) for m, (site, (d, w)) in zip(sent, deltas.items(), strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # The coordinator's round steps hand the rule the updates ordered by site, weighted by num_examples.
    want = build_strategy(rule, params).aggregate(
        g, [ClientUpdate(s, d, w) for s, (d, w) in sorted(deltas.items())], None)
    assert arrays is not None and metrics is not None
    _assert_same(fw.record_state(arrays), want.state)
    assert fw.RANK_KEY not in metrics and abs(float(metrics["loss"]) - 1.0) < 1e-12
    if rule == "fedadam":  # the server state goes on to the next round
        assert strategy.server_state is not None and strategy.server_state.rule == "fedadam"


def test_fedex_lora_carries_the_scaled_residual_to_the_next_round() -> None:
    strategy = FedbridgeStrategy("fedex_lora", residual_scale=2.0)
    g = _state(4, 0)
    deltas = [("site-a", _state(4, 1, 0.1), 16), ("site-b", _state(4, 2, 0.1), 16)]
    sent = _sent(strategy, 1, g, [5, 6])
    assert all(fw.RESIDUAL_RECORD not in m.content.array_records for m in sent)  # round 1: nothing folded yet
    arrays, _ = strategy.aggregate_train(1, [_reply(m, s, d, w) for m, (s, d, w) in zip(sent, deltas, strict=True)])
    want = build_strategy("fedex_lora").aggregate(g, [ClientUpdate(s, d, w) for s, d, w in deltas], None)
    assert arrays is not None
    _assert_same(fw.record_state(arrays), want.state)
    assert want.base_residual
    expected = add_residual({}, dict(want.base_residual), 2.0, frozenset())
    _assert_same(strategy.residual, expected)
    # Round 2's messages carry the cumulative residual the sites fold into their base.
    sent2 = _sent(strategy, 2, fw.record_state(arrays), [5, 6])
    for m in sent2:
        _assert_same(fw.record_state(m.content.array_records[fw.RESIDUAL_RECORD]), expected)


def test_mixed_ranks_reach_the_rule_with_each_sites_rank() -> None:
    strategy = FedbridgeStrategy("hetlora")
    g = _state(4, 0)
    low = truncate_rank(_state(4, 2, 0.1), 2)
    deltas = [("site-a", _state(4, 1, 0.1), 10, 4), ("site-b", low, 30, 2)]
    sent = _sent(strategy, 1, g, [1, 2])
    arrays, _ = strategy.aggregate_train(1, [_reply(m, s, d, w, r) for m, (s, d, w, r) in zip(sent, deltas, strict=True)])
    want = build_strategy("hetlora").aggregate(
        g, [ClientUpdate(s, d, w, {"lora_rank": r}) for s, d, w, r in deltas], None)
    assert arrays is not None
    _assert_same(fw.record_state(arrays), want.state)
    # The rank a site reports is the rank the rule checks its update against.
    sent = _sent(strategy, 2, g, [1, 2])
    lying = [_reply(sent[0], "site-a", _state(4, 1, 0.1), 10, 4), _reply(sent[1], "site-b", _state(4, 2, 0.1), 30, 2)]
    with pytest.raises(AggregationError, match="declared lora_rank 2"):
        strategy.aggregate_train(2, lying)


def test_sampling_follows_fraction_and_minimum_and_each_message_carries_the_task() -> None:
    task = pb.Task(federation_id="f", round=3)
    strategy = FedbridgeStrategy("fedavg", task_for_round=lambda r: pb.Task(federation_id="f", round=r),
                                 fraction_train=0.3, min_train_nodes=2, min_available_nodes=2)
    nodes = list(range(100, 110))
    sent = _sent(strategy, 3, _state(4, 0), nodes)
    assert len(sent) == 3 and len({m.metadata.dst_node_id for m in sent}) == 3
    assert {m.metadata.dst_node_id for m in sent} <= set(nodes)
    for m in sent:
        assert m.metadata.message_type == MessageType.TRAIN
        assert fw.config_task(m.content.config_records[fw.CONFIG_RECORD]) == task
        _assert_same(fw.record_state(m.content.array_records[fw.ADAPTER_RECORD]), _state(4, 0))
    few = FedbridgeStrategy("fedavg", fraction_train=0.1, min_train_nodes=2, min_available_nodes=2)
    assert len(_sent(few, 1, _state(4, 0), nodes)) == 2  # 10% of 10 is 1: the minimum wins


def test_failed_replies_are_left_out_and_a_foreign_reply_is_refused() -> None:
    from flwr.app import Error

    strategy = FedbridgeStrategy("fedavg")
    g = _state(4, 0)
    sent = _sent(strategy, 1, g, [1, 2])
    ok = _reply(sent[0], "site-a", _state(4, 1, 0.1), 8)
    failed = Message(Error(code=0, reason="site refused the task"), reply_to=sent[1])
    arrays, _ = strategy.aggregate_train(1, [ok, failed])
    want = build_strategy("fedavg").aggregate(g, [ClientUpdate("site-a", _state(4, 1, 0.1), 8)], None)
    assert arrays is not None
    _assert_same(fw.record_state(arrays), want.state)
    sent = _sent(strategy, 2, g, [1, 2])
    all_failed = [Message(Error(code=0, reason="refused"), reply_to=m) for m in sent]
    with pytest.raises(AggregationError, match=r"round 2: no node returned an update \(2 failed"):
        strategy.aggregate_train(2, all_failed)  # the round fails; it does not go on with the old adapter
    foreign = Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                                  fw.METRICS_RECORD: MetricRecord({fw.WEIGHT_KEY: 3})}), reply_to=sent[0])
    with pytest.raises(fw.FlowerWireError, match="safetensors"):
        strategy.aggregate_train(2, [foreign])
    no_weight = Message(RecordDict({fw.ADAPTER_RECORD: fw.state_record(_state(4, 1)),
                                    fw.METRICS_RECORD: MetricRecord({"loss": 1.0})}), reply_to=sent[1])
    with pytest.raises(AggregationError, match="num-examples"):
        strategy.aggregate_train(2, [no_weight])


def _task_with(spec: pb.AdapterSpec) -> pb.Task:
    return pb.Task(federation_id="f", round=1, adapter_spec=spec)


def test_replies_are_checked_against_the_rounds_spec_and_compressed_ones_decoded() -> None:
    from fedcommon import compress, tensors

    g = _state(4, 0)
    int8 = pb.Compression(encoding="int8", block_size=8)
    spec = tensors.make_adapter_spec(g, 4, 8.0, 0.0, ["q_proj", "v_proj"], int8)
    strategy = FedbridgeStrategy("fedavg", task_for_round=lambda r: _task_with(spec), min_train_nodes=1,
                                 min_available_nodes=1)
    sent = _sent(strategy, 1, g, [1, 2])
    deltas = {"site-a": _state(4, 1, 0.1), "site-b": _state(4, 2, 0.1)}
    encoded = {s: compress.encode(d, int8) for s, d in deltas.items()}

    # An int8 reply is decoded exactly as fedbridge's ingress decodes an upload, then aggregated by the rule.
    arrays, _ = strategy.aggregate_train(1, [_reply(sent[0], "site-a", encoded["site-a"], 8),
                                            _reply(sent[1], "site-b", encoded["site-b"], 4)])
    decoded = [ClientUpdate(s, compress.decode_update(tensors.encode_state(encoded[s]), spec), w)
               for s, w in (("site-a", 8), ("site-b", 4))]
    assert arrays is not None
    _assert_same(fw.record_state(arrays), build_strategy("fedavg").aggregate(g, decoded, None).state)

    # A dense reply where the spec says int8, a reply off the spec's shapes, a rank above the federation's: refused,
    # naming the node.
    sent = _sent(strategy, 1, g, [1])
    with pytest.raises(AggregationError, match=r"node 1 \(site-a\): the update does not follow the round's adapter "
                                               r"spec at rank 4"):
        strategy.aggregate_train(1, [_reply(sent[0], "site-a", deltas["site-a"], 8)])
    plain = tensors.make_adapter_spec(g, 4, 8.0, 0.0, ["q_proj", "v_proj"])
    dense = FedbridgeStrategy("fedavg", task_for_round=lambda r: _task_with(plain), min_train_nodes=1,
                              min_available_nodes=1)
    sent = _sent(dense, 1, g, [1])
    with pytest.raises(AggregationError, match=r"at rank 4: tensor .* has shape \(3, 6\), the spec says \(4, 6\)"):
        dense.aggregate_train(1, [_reply(sent[0], "site-a", truncate_rank(_state(4, 1), 3), 8)])
    with pytest.raises(AggregationError, match=r"reported LoRA rank 5; this federation trains 1\.\.4"):
        dense.aggregate_train(1, [_reply(sent[0], "site-a", _state(4, 1), 8, rank=5)])
