"""Withdrawing a site: rebuild the global model without its updates, from the per-round ledger.

A site (or a court, or its data-protection officer) may ask that its contributions leave the published model.
:func:`rebuild_without` takes the global adapter that was the input of the first round the site contributed to (a
model the site had no part in), then re-runs the aggregation of every closed round from there with the same
strategy on the updates the coordinator stored for that round, leaving out the site's. Stateful rules (server
optimizers) restart from the state stored before that first round, and FedEx-LoRA residuals are re-accumulated the
same way. A round in which only the withdrawn site contributed leaves the global unchanged. Under central DP every
recomputed round is clipped and noised again with fresh noise (the original draw is not stored), and its ε is
composed with every earlier release: re-publishing from the same updates spends the remaining sites' privacy again,
and the rebuilt rounds' ``dp`` records say how much.

What this does NOT remove, stated plainly (the model card repeats it): the other sites' updates of the later
rounds were *trained* starting from global models that the withdrawn site's earlier updates had influenced. The
rebuild reuses those updates as they were sent, so an indirect influence of the withdrawn site remains. Removing it
would need the remaining sites to retrain those rounds from the rebuilt globals, which the coordinator cannot do on
its own (it never holds their data).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.config import FederationConfig
from coordinator.errors import InvalidState, NotFound
from coordinator.release import evaluation, gate
from coordinator.release.publish import build_provenance, publish
from coordinator.rounds.store import Store, now_ms
from fedcommon import compress, tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from strategies.types import ClientUpdate, ServerState

Progress = Callable[[int, int], None]
# Central DP's step (coordinator.privacy.central_dp.CentralDp.privatize):
#   (updates, earlier rounds' info) -> (noised updates, dp info).
Privatize = Callable[[list[ClientUpdate], list[dict[str, Any]]], tuple[list[ClientUpdate], dict[str, Any]]]

LIMITS_NOTE = ("The other sites' updates of later rounds were trained from global models that the withdrawn site's "
               "earlier updates had influenced; they are reused as sent, so that indirect influence remains. "
               "Removing it would need the remaining sites to retrain those rounds from the rebuilt globals, which "
               "the coordinator cannot do without them.")


@dataclass(frozen=True)
class Rebuild:
    """The result of re-running rounds ``from_round..to_round`` without ``site``.

    Attributes:
        site: The withdrawn site.
        from_round: First round the site contributed to (the rebuild starts from that round's input global).
        to_round: Last closed round (the rebuilt global is the output of this round).
        state: The rebuilt global adapter.
        residual: The rebuilt cumulative base residual (FedEx-LoRA), or None.
        rounds: Per recomputed round: ``round``, ``sites`` aggregated, ``output_sha256`` of the rebuild and
            ``original_output_sha256`` of the stored round.
    """

    site: str
    from_round: int
    to_round: int
    state: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor] | None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def rebuild_without(store: Store, strategy: Any, site: str, *, site_rank: Callable[[str], int], lora_scale: float,
                    spec_for: Callable[[str], pb.AdapterSpec] | None = None,
                    progress: Progress | None = None, privatize: Privatize | None = None,
                    fan_in_fan_out: frozenset[str] = frozenset()) -> Rebuild:
    """Re-aggregate every closed round from the first one ``site`` joined, without ``site``'s updates.

    Args:
        store: The coordinator's store (read only).
        strategy: The federation's strategy (``strategies.registry.build_strategy``).
        site: The site to withdraw.
        site_rank: The LoRA rank a site trains (passed to the rule as update metadata, as the engine does).
        spec_for: The adapter spec a site trains; its compression says how the site's stored updates decode
            (None: stored dense).
        lora_scale: alpha / r of the federation's adapter (FedEx-LoRA residuals are scaled by it).
        fan_in_fan_out: Base weights stored ``[in, out]`` (Conv1D), whose residuals are transposed as the engine's.
        progress: Called with ``(rounds_done, rounds_total)`` after each recomputed round.
        privatize: Central DP's clip-and-noise step, when the federation runs central DP.

    Returns:
        The rebuilt global and the per-round record.

    Raises:
        NotFound: The site has no accepted update.
        InvalidState: The site contributed only to a round that has not closed yet.
    """
    mine = sorted({e["round"] for e in store.ledger() if e["site"] == site})
    if not mine:
        raise NotFound(f"site {site!r} has no accepted update in this federation; there is nothing to withdraw")
    first = mine[0]
    closed = [r for r in store.rounds() if r.state == "closed" and r.round >= first]
    if not closed:
        raise InvalidState(f"site {site!r} contributed only to round {first}, which has not closed; nothing "
                           "published contains it yet")
    state = tensors.decode_state(store.adapter_path(first).read_bytes())
    res_path = store.residual_path(first)
    residual = tensors.decode_state(res_path.read_bytes()) if res_path.exists() else None
    server: ServerState | None = None
    if strategy.stateful and first > 1:
        flat = store.get_server_state(first - 1)
        server = None if flat is None else ServerState.from_flat(flat[0], flat[1])
    record: list[dict[str, Any]] = []
    released = [r.info for r in store.rounds() if r.state == "closed"]  # every release so far, for DP composition
    for i, row in enumerate(closed):
        ups = [u for u in store.updates(row.round) if u.site != site]
        dp: dict[str, Any] = {}
        if ups:
            updates = [ClientUpdate(u.site, tensors.decode_state(u.path.read_bytes()) if spec_for is None
                                    else compress.decode_update(u.path.read_bytes(), spec_for(u.site)), u.num_examples,
                                    {"lora_rank": site_rank(u.site)}) for u in ups]
            if privatize is not None:
                updates, dp = privatize(updates, released)
                released.append({"dp": dp})
            result = strategy.aggregate(state, updates, server)
            state, server = result.state, result.server_state
            if result.base_residual:
                residual = _add_residual(residual, result.base_residual, lora_scale, fan_in_fan_out)
        record.append({"round": row.round, "sites": [u.site for u in ups],
                       "output_sha256": codec.sha256_hex(tensors.encode_state(state)),
                       "original_output_sha256": row.output_sha256, **({"dp": dp} if dp else {})})
        if progress is not None:
            progress(i + 1, len(closed))
    return Rebuild(site, first, closed[-1].round, state, residual, record)


def _add_residual(total: dict[str, torch.Tensor] | None, residual: dict[str, torch.Tensor],
                  scale: float, fan_in_fan_out: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """As the engine's ``_carry_residual``: add ``scale * residual`` in float64, store float32, in weight layout."""
    from coordinator.rounds.adapter import scaled_residual_in_weight_layout

    out = dict(total or {})
    for name, add in scaled_residual_in_weight_layout(residual, scale, fan_in_fan_out).items():
        out[name] = out[name] + add if name in out else add
    return out


def redact_provenance(prov: dict[str, Any], rb: Rebuild, *, reason: str, actor: str) -> dict[str, Any]:
    """The provenance of the rebuilt version: the withdrawn site's updates, ε and contributor entry removed, the
    recomputed rounds' output hashes replaced, and a ``withdrawal`` record that says what was and was not removed."""
    out = copy.deepcopy(prov)
    recomputed = {r["round"]: r for r in rb.rounds}
    for entry in out.get("ledger", []):
        entry["updates"] = [u for u in entry["updates"] if u["site"] != rb.site]
        if entry["round"] in recomputed:
            entry["output_sha256"] = recomputed[entry["round"]]["output_sha256"]
    out["ledger"] = [e for e in out.get("ledger", []) if e["round"] <= rb.to_round]
    for r in out.get("rounds", []):
        if r["round"] in recomputed:
            r["output_sha256"] = recomputed[r["round"]]["output_sha256"]
            r.pop("updates", None)
            if "dp" in recomputed[r["round"]]:
                r["dp"] = recomputed[r["round"]]["dp"]
    out["rounds"] = [r for r in out.get("rounds", []) if r["round"] <= rb.to_round]
    out["sites"] = [s for s in out.get("sites", []) if s != rb.site]
    out["contributors"] = [c for c in out.get("contributors", []) if c["name"] != rb.site]
    privacy = out.get("privacy", {})
    for key in ("epsilon", "delta"):
        if isinstance(privacy.get(key), dict):
            privacy[key] = {s: e for s, e in privacy[key].items() if s != rb.site}
    redone = [r["dp"] for r in rb.rounds if r.get("dp")]
    if redone and "central" in privacy:  # the re-noised rounds are further releases of the same updates
        central = privacy["central"]
        central.update(epsilon=redone[-1]["epsilon"], rounds=central["rounds"] + len(redone),
                       note="composed over the federation's rounds and the withdrawal's re-noised rounds")
    out["withdrawal"] = {"site": rb.site, "from_round": rb.from_round, "to_round": rb.to_round, "reason": reason,
                         "actor": actor, "rounds": rb.rounds, "limits": LIMITS_NOTE}
    return out


def publish_rebuild(cfg: FederationConfig, store: Store, rb: Rebuild, *, base_sha256: str, spec: pb.AdapterSpec,
                    strategy: str, reason: str, actor: str) -> dict[str, Any]:
    """Gate and publish the rebuilt model as a new version (or record the blocked publication).

    When shared evaluation is configured the rebuilt model is evaluated first and the release gate judges those
    scores; otherwise it is published unevaluated (and a gate with thresholds blocks it, saying why).

    Returns:
        ``{"site", "from_round", "to_round", "published", "version", "path", "global_sha256", "blocked_reason"}``.
    """
    ev: dict[str, Any] = {"enabled": cfg.evaluation.enabled}
    scores = None
    if cfg.evaluation.enabled:
        report = evaluation.evaluate_adapter(base_model=cfg.base_model, spec=spec, state=rb.state,
                                             eval_spec=cfg.evaluation, residual=rb.residual,
                                             work_dir=store.dir / "eval" / f"withdraw-{rb.site}-{now_ms()}")
        scores = report.scores()
        ev.update({"framework": "EvalScope", "round": rb.to_round, "status": "ok", "error": "",
                   "scores": dict(sorted(scores.items())),
                   "primary_metrics": {b: r.primary_metric for b, r in report.results.items()},
                   "benchmarks": {b: {k: v for k, (v, _n) in kv.items()} for b, kv in report.store_rows().items()}})
    decision = gate.decide(scores, cfg.gate.thresholds, cfg.gate.max_regression,
                           gate.last_published(cfg.registry_dir / cfg.federation_id),
                           evaluation_error="" if scores is not None else "shared evaluation is not configured")
    result: dict[str, Any] = {"site": rb.site, "from_round": rb.from_round, "to_round": rb.to_round,
                              "published": decision.passed, "version": 0, "path": "",
                              "global_sha256": codec.sha256_hex(tensors.encode_state(rb.state)),
                              "blocked_reason": decision.reason}
    if not decision.passed:
        store.add_blocked_publication(rb.to_round, f"withdrawal of {rb.site}: {decision.reason}", decision.to_dict())
        return result
    prov = build_provenance(cfg, store, base_sha256=base_sha256, spec=spec, strategy=strategy,
                            global_sha256=result["global_sha256"], gate=decision)
    prov = redact_provenance(prov, rb, reason=reason, actor=actor)
    prov["evaluation"] = ev
    version, path, manifest_sha = publish(base_model=cfg.base_model, spec=spec, state=rb.state,
                                          registry_dir=cfg.registry_dir, federation_id=cfg.federation_id,
                                          provenance=prov, base_model_ref=cfg.base_model_ref,
                                          max_shard_bytes=cfg.publish.max_shard_mb << 20, residual=rb.residual)
    store.add_publication(version, rb.to_round, path, manifest_sha)
    result.update(version=version, path=str(path))
    return result
