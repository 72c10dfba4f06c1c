"""The round's steps that run in a worker thread: aggregate, evaluate, publish.

:class:`RoundSteps` holds no state of its own beyond what it is given: each step reads and writes the store, so a
restart repeats at most the step that was cut off. The engine decides when a step runs (under its lock).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from coordinator.config import FederationConfig
from coordinator.privacy.central_dp import CentralDp
from coordinator.privacy.secagg import SecAggCoordinator
from coordinator.release import evaluation, gate
from coordinator.release.publish import build_provenance, find_published
from coordinator.release.publish import publish as publish_to_registry
from coordinator.rounds.adapter import add_residual, base_layout, peft_view
from coordinator.rounds.adapters import Adapters
from coordinator.rounds.mapped import map_state
from coordinator.rounds.store import Store, UpdateRow
from fedcommon import compress, tensors
from protos import codec
from strategies.error_meter import aggregation_error_from_updates
from strategies.registry import BatchStrategy, StreamingStrategy
from strategies.types import ClientUpdate, ServerState

log = logging.getLogger(__name__)

Audit = Callable[[str, dict[str, Any]], None]
Hold = Callable[[str, int], None]  # test-only hold point: (phase, round), see coordinator.rounds.engine.HOLD_ENV


class StoredUpdateMismatch(RuntimeError):
    """A stored update file no longer hashes to the payload SHA-256 its row (and the provenance) records."""


def check_stored_updates(round: int, ups: list[UpdateRow]) -> None:
    """Refuse to aggregate unless every update file holds exactly the bytes that were accepted and recorded, so the
    aggregate, the round info and provenance.json can never name different updates.

    Raises:
        StoredUpdateMismatch: A file is missing, or its SHA-256 or size differs from the accepted one.
    """
    for u in ups:
        h = hashlib.sha256()
        try:
            with open(u.path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        except FileNotFoundError:
            raise StoredUpdateMismatch(f"round {round}: the stored update of site {u.site!r} ({u.path}) is "
                                       "missing; refusing to aggregate") from None
        if h.hexdigest() != u.payload_sha256:
            raise StoredUpdateMismatch(f"round {round}: the stored update of site {u.site!r} ({u.path}) hashes to "
                                       f"{h.hexdigest()[:16]}…, but {u.payload_sha256[:16]}… was accepted and "
                                       "recorded; refusing to aggregate")


class RoundSteps:
    """Aggregation (plain or secure), FedEx residual carry, shared evaluation and publication.

    Args:
        config: The federation config.
        store: Durable state (every step's input and output).
        base_sha256: Manifest hash of the base model (recorded in the provenance of a published version).
        strategy: The aggregation rule.
        adapters: The global adapters and residuals by round, and each site's rank.
        secagg: Secure aggregation, when the federation runs it (the round's updates are then masked).
        central_dp: Central differential privacy, when configured (clip each update, noise the aggregate).
        audit: Appends an event to the audit log.
        hold: The test-only hold point (blocks in a phase when the crash tests ask for it).
    """

    def __init__(self, config: FederationConfig, store: Store, base_sha256: str,
                 strategy: StreamingStrategy | BatchStrategy, adapters: Adapters, secagg: SecAggCoordinator | None,
                 central_dp: CentralDp | None, audit: Audit, hold: Hold) -> None:
        self.cfg = config
        self.store = store
        self.base_sha256 = base_sha256
        self.spec = adapters.spec
        self.strategy = strategy
        self.adapters = adapters
        self.secagg = secagg
        self.central_dp = central_dp
        self._audit = audit
        self._hold = hold
        self._fan_in_fan_out: frozenset[str] | None = None

    def _stored_update(self, u: UpdateRow) -> Mapping[str, torch.Tensor]:
        """A stored update as the rule reads it: memory-mapped, or decoded to dense tensors when the federation
        compresses updates (the store keeps the bytes as the site signed them, so the stored-hash check holds)."""
        spec = self.adapters.spec_for(u.site)
        if spec.compression.encoding:
            return compress.decode_update(u.path.read_bytes(), spec)
        return map_state(u.path)

    # -- aggregation and publishing (run in a worker thread) ----------------------------------------------------
    def aggregate(self, round: int, ups: list[UpdateRow]) -> None:
        """Aggregate round ``round``'s stored updates into the next global adapter and close the round."""
        check_stored_updates(round, ups)
        global_state = tensors.decode_state(self.adapters.adapter_bytes(round))
        if self.secagg is not None:
            self._aggregate_secure(round, ups, self.secagg, global_state)
            return

        # The aggregation-error meter below needs every site's factors, so the rule and the meter share one list of
        # the round's stored updates, each memory-mapped (header re-validated, tensors zero-copy views of the page
        # cache): the rule folds them block by block and the meter reads one module of every site at a time, so the
        # heap holds the outputs, not N decoded copies.
        # A late update carried in from an earlier round weighs num_examples * (1 + staleness)^-a (FedAsync); it
        # gets its own name so a site's fresh and late updates are distinct contributions. Rules that ignore
        # weights (median, trimmed mean, Krum) ignore the staleness factor too.
        updates = [ClientUpdate(u.site if u.trained_round == round else f"{u.site}~r{u.trained_round}",
                                self._stored_update(u),
                                u.num_examples if u.weight == 1.0 else u.num_examples * u.weight,  # type: ignore[arg-type]
                                {"lora_rank": self.adapters.site_rank(u.site)}) for u in ups]
        dp_info: dict[str, Any] = {}
        if self.central_dp is not None:
            updates, dp_info = self.central_dp.privatize(updates, [r.info for r in self.store.rounds() if r.round < round])
        result = self.strategy.aggregate(global_state, updates, self._server_state(round - 1))
        payload = tensors.encode_state(result.state)
        self._carry_residual(round, result.base_residual)
        self.store.put_adapter(round + 1, payload)
        self._hold("aggregating", round)
        if result.server_state is not None:
            self.store.put_server_state(round, result.server_state.rule, result.server_state.to_flat())
        # The aggregation-error meter compares what is published with the exact mean of the sites' B·A products.
        errors = aggregation_error_from_updates(global_state, updates, result.state, result.base_residual)
        finite = [e for e in errors.values() if e == e]
        info: dict[str, Any] = {
            "strategy": self.strategy.name, "strategy_params": dict(self.cfg.strategy_params),
            "updates": {u.site: {"payload_sha256": u.payload_sha256, "num_examples": u.num_examples,
                                 "bytes": u.size} for u in ups if u.trained_round == round},
            "late_updates": [{"site": u.site, "trained_round": u.trained_round, "staleness": u.staleness,
                              "weight": u.weight, "payload_sha256": u.payload_sha256, "num_examples": u.num_examples}
                             for u in ups if u.trained_round != round],
            "decisions": [{"event": e["event"], "attempt": e["attempt"], "site": e["site"], **e["detail"]}
                          for e in self.store.events(round)],
            "strategy_info": dict(result.info),
            "aggregation_error": {"mean": sum(finite) / len(finite) if finite else 0.0,
                                  "max": max(finite, default=0.0), "per_module": errors},
            **({"dp": dp_info} if dp_info else {}),
        }
        self.store.close_round(round, codec.sha256_hex(payload), info)
        log.info("[RoundEngine.aggregate] round=%d sites=%d strategy=%s error_mean=%.4g closed", round, len(ups),
                 self.strategy.name, info["aggregation_error"]["mean"])

    def _aggregate_secure(self, round: int, ups: list[UpdateRow], secagg: SecAggCoordinator,
                          global_state: dict[str, torch.Tensor]) -> None:
        """Secure aggregation: unmask only the weighted mean and hand it to the rule as one aggregate update.

        The rules allowed here (``linear``) need only the mean; the aggregation-error meter needs each site's
        factors, which no one sees, so it is not measured. Masked inputs stay in the store; shares are deleted.
        """
        agg = secagg.unmask(round, ups)
        update = ClientUpdate("secure-aggregate", agg.mean_delta, agg.total_weight, {"lora_rank": self.spec.rank})
        result = self.strategy.aggregate(global_state, [update], self._server_state(round - 1))
        payload = tensors.encode_state(result.state)
        self.store.put_adapter(round + 1, payload)
        if result.server_state is not None:
            self.store.put_server_state(round, result.server_state.rule, result.server_state.to_flat())
        info: dict[str, Any] = {
            "strategy": self.strategy.name, "strategy_params": dict(self.cfg.strategy_params),
            "updates": {u.site: {"payload_sha256": u.payload_sha256, "num_examples": u.num_examples, "bytes": u.size,
                                 "masked": True} for u in ups if u.site in agg.info["sites"]},
            "strategy_info": dict(result.info), "secure_aggregation": agg.info,
            "aggregation_error": {"mean": None, "max": None, "per_module": {},
                                  "note": "not measurable under secure aggregation (no individual update is seen)"},
        }
        self.store.close_round(round, codec.sha256_hex(payload), info)
        self.store.secagg_forget()
        log.info("[RoundEngine.aggregate] round=%d sites=%d dropped=%d strategy=%s secure_aggregation closed", round,
                 len(agg.info["sites"]), len(agg.info["dropped"]), self.strategy.name)

    def _carry_residual(self, round: int, residual: dict[str, Any]) -> None:
        """FedEx-LoRA: add this round's residual, scaled by alpha/r, to the cumulative one sites fold into the base.

        Written before the round's output adapter, so a round never closes with a residual missing.
        """
        previous = self.adapters.residual_bytes(round)
        if not residual and previous is None:
            return
        total = tensors.decode_state(previous) if previous is not None else {}
        if self._fan_in_fan_out is None:  # read once, from the base's config (no weight is loaded)
            self._fan_in_fan_out = base_layout(self.cfg.base_model).fan_in_fan_out
        total = add_residual(total, residual, self.spec.alpha / self.spec.rank, self._fan_in_fan_out)
        self.store.put_residual(round + 1, tensors.encode_state(total))

    def _server_state(self, round: int) -> ServerState | None:
        """The server optimizer state stored after ``round`` (None before the first or for stateless rules)."""
        if not self.strategy.stateful or round < 1:
            return None
        flat = self.store.get_server_state(round)
        return None if flat is None else ServerState.from_flat(flat[0], flat[1])

    def evaluation_due(self, round: int) -> bool:
        """Round ``round`` closed, its output is to be evaluated (every k rounds and the last), and was not yet."""
        ev = self.cfg.evaluation
        due = ev.enabled and evaluation.is_due(round, self.cfg.rounds, ev.every_k_rounds)
        return due and self.store.eval_run(round) is None

    def evaluate(self, round: int) -> None:
        """Run the shared benchmarks on round ``round``'s output merged into the base; record scores or the failure.

        A failed evaluation is recorded (and logged as an error), never scored: the release gate then blocks.
        """
        data = self.adapters.adapter_bytes(round + 1)
        residual = self.adapters.residual_bytes(round + 1)
        work = self.store.dir / "eval" / f"round-{round:05d}"
        log.info("[RoundEngine.evaluate] round=%d benchmarks=%s", round, [b.name for b in self.cfg.evaluation.benchmarks])
        try:
            spec, state = peft_view(self.cfg.base_model, self.spec, tensors.decode_state(data))  # Fed-SB: B R, A
            report = evaluation.evaluate_adapter(base_model=self.cfg.base_model, spec=spec,
                                                 state=state, eval_spec=self.cfg.evaluation,
                                                 work_dir=work,
                                                 residual=tensors.decode_state(residual) if residual else None)
            self._hold("evaluating", round)
        except Exception as e:  # EvaluationError, and anything EvalScope raises: record it, keep the federation going
            log.exception("[RoundEngine.evaluate] round=%d failed", round)
            self.store.put_eval_run(round, status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                                    adapter_sha256=codec.sha256_hex(data), seconds=0.0, work_dir=work, scores={},
                                    primary_metrics={})
            return
        self.store.put_eval_run(round, status="ok", error="", adapter_sha256=codec.sha256_hex(data),
                                seconds=report.seconds, work_dir=work, scores=report.store_rows(),
                                primary_metrics={b: r.primary_metric for b, r in report.results.items()})
        log.info("[RoundEngine.evaluate] round=%d scores=%s seconds=%.1f", round,
                 {b: f"{v:.4f}" for b, v in report.scores().items()}, report.seconds)

    def publish(self, final: int | None = None) -> None:
        """Publish round ``final``'s output (default: the last round's) if the release gate passes; else record the
        blocked publication."""
        final = self.cfg.rounds if final is None else final
        data = self.adapters.adapter_bytes(final + 1)
        # Idempotent: a crash after the registry write and before the store recorded it left the version there;
        # adopt it (found by federation, round and global adapter hash) instead of publishing the same model again.
        found = find_published(self.cfg.registry_dir / self.cfg.federation_id, self.cfg.federation_id, final,
                               codec.sha256_hex(data))
        if found is not None:
            self.store.add_publication(found[0], final, found[1], found[2])
            self._audit("published", {"round": final, "version": found[0], "manifest_sha256": found[2],
                                      "adopted": True})
            log.warning("[RoundEngine.publish] round=%d already published as v%d before a restart; recorded it",
                        final, found[0])
            return
        run = self.store.eval_run(final)
        scores = ({b: kv["score"] for b, kv in self.store.eval_scores(final).get(final, {}).items()}
                  if run and run["status"] == "ok" else None)
        decision = gate.decide(scores, self.cfg.gate.thresholds, self.cfg.gate.max_regression,
                               gate.last_published(self.cfg.registry_dir / self.cfg.federation_id),
                               evaluation_error=run["error"] if run else "")
        if not decision.passed:
            self.store.add_blocked_publication(final, decision.reason, decision.to_dict())
            self._audit("publication_blocked", {"round": final, "reason": decision.reason[:1000]})
            log.warning("[RoundEngine.publish] round=%d blocked by the release gate: %s", final, decision.reason)
            return
        provenance = build_provenance(self.cfg, self.store, base_sha256=self.base_sha256, spec=self.spec,
                                      strategy=self.strategy.name, global_sha256=codec.sha256_hex(data), gate=decision)
        residual = self.adapters.residual_bytes(final + 1)
        # A Fed-SB adapter (R matrices) is published as the stock PEFT LoRA it stands for: lora_B = B R, lora_A = A.
        spec, state = peft_view(self.cfg.base_model, self.spec, tensors.decode_state(data))
        version, path, manifest_sha = publish_to_registry(base_model=self.cfg.base_model, spec=spec,
                                              state=state, registry_dir=self.cfg.registry_dir,
                                              federation_id=self.cfg.federation_id, provenance=provenance,
                                              base_model_ref=self.cfg.base_model_ref,
                                              max_shard_bytes=self.cfg.publish.max_shard_mb << 20,
                                              residual=tensors.decode_state(residual) if residual else None)
        self._hold("publishing", final)
        self.store.add_publication(version, final, path, manifest_sha)
        self._audit("model_published", {"round": final, "version": version, "path": str(path),
                                        "manifest_sha256": manifest_sha, "global_sha256": codec.sha256_hex(data)})
