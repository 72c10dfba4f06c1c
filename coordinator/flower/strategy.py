"""Any aggregation rule of :mod:`strategies` as a Flower ``Strategy``.

:class:`FedbridgeStrategy` takes the rule by the name ``federation.toml`` uses (``fedavg``, ``fedex_lora``,
``hetlora``, ``flexlora``, ``fedadam``, ``krum``...; :func:`strategies.registry.list_strategies`) and aggregates
through :func:`strategies.registry.build_strategy`'s object, exactly as the coordinator's round steps do: the same
:class:`~strategies.types.ClientUpdate` list (ordered by site name, weighted by the site's reported weight, with
the site's LoRA rank for the mixed-rank rules), the same server state passed from round to round, and FedEx-LoRA's
residual scaled into each weight's layout and added to the cumulative one
(:func:`coordinator.rounds.adapter.add_residual`), which goes to the sites with every later round.

Sampling (``fraction_*``, ``min_*_nodes``, waiting for ``min_available_nodes``) and message construction are
Flower's own :class:`flwr.serverapp.strategy.FedAvg`; only the aggregation is replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from coordinator.rounds.adapter import add_residual
from fedcommon import compress
from fedcommon import flowerwire as fw
from fedcommon.siterank import site_spec
from protos.codec import CodecError
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.registry import build_strategy
from strategies.types import AggregationError, ClientUpdate, ServerState

log = logging.getLogger(__name__)

TaskForRound = Callable[[int], pb.Task]


class FedbridgeStrategy(FedAvg):
    """A :mod:`strategies` rule behind Flower's Strategy interface.

    Args:
        rule: The rule's registered name.
        params: Its parameters (``[strategy_params]``), checked by ``build_strategy``.
        task_for_round: The fedbridge task of a round (sent with each train and evaluate message); None: no task
            (for tests of the aggregation alone).
        residual_scale: ``alpha / r`` of the federation's adapter, the scale of a FedEx-LoRA residual.
        fan_in_fan_out: Base weights stored ``[in, out]`` (Conv1D), into whose layout a residual is transposed.
        fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes: Flower's
            sampling (see :class:`flwr.serverapp.strategy.FedAvg`).

    Attributes:
        residual: The cumulative scaled base residual (FedEx-LoRA); empty for other rules.
        server_state: The rule's server state after the last round (stateful rules).
        last_info: The rule's ``info`` of the last round.
    """

    def __init__(self, rule: str = "fedavg", params: Mapping[str, object] | None = None, *,
                 task_for_round: TaskForRound | None = None, residual_scale: float = 1.0,
                 fan_in_fan_out: frozenset[str] = frozenset(), fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 2, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 2) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=fw.WEIGHT_KEY,
                         arrayrecord_key=fw.ADAPTER_RECORD, configrecord_key=fw.CONFIG_RECORD)
        self.rule = build_strategy(rule, dict(params or {}))
        self.task_for_round = task_for_round
        self.residual_scale = residual_scale
        self.fan_in_fan_out = fan_in_fan_out
        self.residual: dict[str, torch.Tensor] = {}
        self.server_state: ServerState | None = None
        self.last_info: dict[str, Any] = {}
        self._global: dict[int, dict[str, torch.Tensor]] = {}
        self._spec: pb.AdapterSpec | None = None  # the round's adapter spec (None: no task, the aggregation alone)
        self._site_specs: dict[int, pb.AdapterSpec] = {}  # the round's spec at each rank the replies report

    def summary(self) -> None:
        log.info("FedbridgeStrategy: rule=%s linear=%s stateful=%s", self.rule.name, self.rule.linear,
                 self.rule.stateful)
        super().summary()

    def _with_task(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = ConfigRecord(dict(config))
        out[fw.RULE_KEY] = self.rule.name
        if self.task_for_round is not None:
            out[fw.TASK_KEY] = self.task_for_round(server_round).SerializeToString(deterministic=True)
        return out

    def _add_residual(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if self.residual:
            record = fw.state_record(self.residual)
            for m in messages:
                m.content[fw.RESIDUAL_RECORD] = record
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling; each message carries the global adapter, the round's task and the residual."""
        self._global = {server_round: fw.record_state(arrays, fw.ADAPTER_RECORD)}
        self._spec = self.task_for_round(server_round).adapter_spec if self.task_for_round else None
        self._site_specs = {}
        return self._add_residual(super().configure_train(server_round, arrays, self._with_task(server_round, config),
                                                          grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's sampling; the sites score ``arrays`` on base + the residual they trained on."""
        return self._add_residual(super().configure_evaluate(server_round, arrays,
                                                             self._with_task(server_round, config), grid))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' deltas with the rule; failed replies are left out (and logged by Flower).

        Raises:
            AggregationError: No node returned an update, a reply without a delta or weight, or updates the rule
                refuses.
        """
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:  # Flower would go on with the old adapter; fedbridge fails the round, as its coordinator does
            nodes = sorted(m.metadata.src_node_id for m in failed)
            raise AggregationError(f"round {server_round}: no node returned an update ({len(nodes)} failed: nodes "
                                   f"{nodes[:8]}); see those SuperNodes' logs for why")
        if server_round not in self._global:
            raise AggregationError(f"round {server_round}: no global adapter was sent for this round")
        global_state = self._global[server_round]
        updates = sorted((self._update(m, server_round) for m in valid), key=lambda u: u.site)
        result = self.rule.aggregate(global_state, updates, self.server_state)
        self.server_state = result.server_state
        if result.base_residual:
            self.residual = add_residual(self.residual, dict(result.base_residual), self.residual_scale,
                                         self.fan_in_fan_out)
        self.last_info = dict(result.info)
        metrics = aggregate_metricrecords([m.content for m in valid], self.weighted_by_key)
        metrics.pop(fw.RANK_KEY, None)
        return fw.state_record(result.state), metrics

    def _update(self, msg: Message, server_round: int) -> ClientUpdate:
        """The reply as the rule's input, checked as fedbridge's ingress checks an upload: against the round's
        adapter spec (at the rank the site reports), decoded first when the spec names a compression."""
        content = msg.content
        node = msg.metadata.src_node_id
        if fw.ADAPTER_RECORD not in content.array_records or fw.METRICS_RECORD not in content.metric_records:
            raise AggregationError(f"node {node}: the reply carries no {fw.ADAPTER_RECORD!r} delta or "
                                   f"{fw.METRICS_RECORD!r} record (is its ClientApp fedbridge's?)")
        metrics = content.metric_records[fw.METRICS_RECORD]
        weight = metrics.get(fw.WEIGHT_KEY)
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise AggregationError(f"node {node}: {fw.WEIGHT_KEY!r} is not an integer")
        site = content.config_records[fw.CONFIG_RECORD].get("site") if fw.CONFIG_RECORD in content.config_records \
            else None
        info: dict[str, float | int | str] = {}
        if isinstance(metrics.get(fw.RANK_KEY), int):
            info["lora_rank"] = int(metrics[fw.RANK_KEY])  # type: ignore[arg-type]
        name = str(site) if site else f"node-{node}"
        record = content.array_records[fw.ADAPTER_RECORD]
        spec = self._spec
        if spec is None:  # no task (the aggregation alone): the state as sent
            return ClientUpdate(name, fw.record_state(record, fw.ADAPTER_RECORD), weight, info)
        rank = int(info.get("lora_rank", spec.rank))
        if not 1 <= rank <= spec.rank:
            raise AggregationError(f"node {node} ({name}): reported LoRA rank {rank}; this federation trains "
                                   f"1..{spec.rank}")
        if rank not in self._site_specs:  # built once per rank and round, not per reply
            self._site_specs[rank] = site_spec(spec, self._global[server_round], rank)
        try:
            state = compress.decode_update(fw.record_bytes(record, fw.ADAPTER_RECORD), self._site_specs[rank])
        except CodecError as e:
            raise AggregationError(f"node {node} ({name}): the update does not follow the round's adapter spec "
                                   f"at rank {rank}: {e}") from None
        return ClientUpdate(name, state, weight, info)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the held-out metrics of the sites that have a held-out split (weight > 0)."""
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        scored = [m.content for m in valid if fw.METRICS_RECORD in m.content.metric_records
                  and float(m.content.metric_records[fw.METRICS_RECORD].get(fw.WEIGHT_KEY, 0) or 0) > 0]  # type: ignore[arg-type]
        return aggregate_metricrecords(scored, self.weighted_by_key) if scored else None
