"""Read-only views of a running federation for the admin API and the dashboard: plain JSON-able dicts.

Everything here is read from the engine and its store at call time. Nothing here returns tensors, payload bytes,
keys or tokens: only names, hashes, counts, scalars the sites reported, and the release gate's reasons.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from coordinator.metrics import SEEN_RECENTLY_S

if TYPE_CHECKING:
    from coordinator.rounds.engine import RoundEngine


def status(engine: RoundEngine) -> dict[str, Any]:
    """The federation's control state and where its current round stands."""
    store, cfg = engine.store, engine.cfg
    cur = store.current_round()
    pubs = store.publications()
    sites = store.sites()
    now = time.time()
    revoked = {r["name"] for r in store.revocations()}
    problems = []
    for s in sites:
        kind, why = engine.quorum.problem(s["name"])
        if kind and s["name"] not in revoked:
            problems.append(f"{s['name']} {kind}: {why}")
    return {
        "federation_id": cfg.federation_id, "state": engine.control.control_state(),
        "current_round": cur.round if cur else 0, "round_state": cur.state if cur else "",
        "total_rounds": cfg.rounds, "min_sites": cfg.min_sites,
        "round_updates": len(store.updates(cur.round)) if cur else 0,
        "round_sites": [u.site for u in store.updates(cur.round)] if cur else [],
        "sites_joined": len(sites),
        "sites_connected": sum(1 for s in sites if now - engine.last_seen(s["name"]) < SEEN_RECENTLY_S),
        "strategy": engine.strategy.name, "latest_version": pubs[-1]["version"] if pubs else 0,
        "site_problems": problems,
    }


def sites(engine: RoundEngine) -> list[dict[str, Any]]:
    """Joined sites: status, region (:func:`coordinator.release.records.site_regions`: its certificate's, else its
    enrolment record's, else the config's ``publish.site_regions``; empty when none names one), last seen, ε of the
    latest update. A revoked site's status is ``revoked``; one that reported its crash is ``failed`` and one silent
    past the heartbeat timeout ``silent``, with the reason in ``problem``."""
    from coordinator.release.records import site_regions

    store, cfg = engine.store, engine.cfg
    regions = site_regions(cfg, store.site_regions())
    revoked = {r["name"] for r in store.revocations()}
    cur = store.current_round()
    in_round = {u.site for u in store.updates(cur.round)} if cur and cur.state == "open" else set()
    latest_eps = store.site_epsilon()
    counts = Counter(u.site for u in store.updates())
    now = time.time()
    out = []
    for s in store.sites():
        seen = engine.last_seen(s["name"])
        state = "uploaded" if s["name"] in in_round else ("active" if now - seen < SEEN_RECENTLY_S else "offline")
        kind, why = engine.quorum.problem(s["name"])  # a dead site is dead, even after it uploaded
        state, problem = (kind, f"{kind}: {why}") if kind else (state, "")
        state, problem = ("revoked", "") if s["name"] in revoked else (state, problem)
        out.append({"name": s["name"], "fingerprint": s["fingerprint"], "agent_version": s["agent_version"] or "",
                    "lora_rank": int(s["lora_rank"] or 0), "region": regions.get(s["name"], ""),
                    "joined_ms": int(s["joined_ms"]), "last_seen_ms": int(seen * 1000), "status": state,
                    "epsilon_spent": latest_eps.get(s["name"], 0.0), "updates": counts.get(s["name"], 0),
                    "problem": problem})
    return out


def train_losses(engine: RoundEngine) -> dict[str, list[tuple[int, float]]]:
    """Per site, ``(round, loss)`` of its ``train`` metric reports, by round."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r, site, phase, key, value, _n in engine.store.metrics():
        if phase == "train" and key == "loss":
            out.setdefault(site, []).append((r, value))
    return out


def rounds(engine: RoundEngine) -> list[dict[str, Any]]:
    """Every round: state, hashes, contributing sites, aggregation error, mean train loss."""
    store = engine.store
    by_round: dict[int, list[str]] = {}
    for u in store.updates():
        by_round.setdefault(u.round, []).append(u.site)
    loss: dict[int, list[float]] = {}
    for site_losses in train_losses(engine).values():
        for rnd, v in site_losses:
            loss.setdefault(rnd, []).append(v)
    out = []
    for r in store.rounds():
        # A SecAgg round records its aggregation error as None (not measurable): shown as 0, never a TypeError.
        err = r.info.get("aggregation_error", {})
        out.append({"round": r.round, "state": r.state, "input_sha256": r.input_sha256,
                    "output_sha256": r.output_sha256 or "", "opened_ms": r.opened_ms, "closed_ms": r.closed_ms or 0,
                    "sites": by_round.get(r.round, []),
                    "aggregation_error_mean": float(err.get("mean") or 0.0),
                    "aggregation_error_max": float(err.get("max") or 0.0),
                    "train_loss": sum(loss[r.round]) / len(loss[r.round]) if loss.get(r.round) else 0.0})
    return out


def evaluations(engine: RoundEngine) -> list[dict[str, Any]]:
    """Shared-benchmark runs: round, status, error, seconds, primary score per benchmark."""
    scores = engine.store.eval_scores()
    return [{"round": run["round"], "status": run["status"], "error": run["error"], "seconds": float(run["seconds"]),
             "scores": {b: kv["score"] for b, kv in sorted(scores.get(run["round"], {}).items()) if "score" in kv}}
            for run in engine.store.eval_runs()]


def releases(engine: RoundEngine) -> dict[str, list[dict[str, Any]]]:
    """Published versions and blocked publications (with the gate's reason)."""
    store = engine.store
    return {"published": [{"version": p["version"], "round": p["round"], "path": p["path"],
                           "published_ms": p["published_ms"]} for p in store.publications()],
            "blocked": [{"round": b["round"], "reason": b["reason"], "decided_ms": b["decided_ms"]}
                        for b in store.blocked_publications()]}


def snapshot(engine: RoundEngine) -> dict[str, Any]:
    """Everything the dashboard page shows, in one document."""
    return {"status": status(engine), "sites": sites(engine), "rounds": rounds(engine),
            "train_loss": train_losses(engine), "evaluations": evaluations(engine), "releases": releases(engine)}
