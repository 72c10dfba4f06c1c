"""A GDPR Art. 30 style record of processing for a federation (``fedbridge-admin export-records``).

Every statement comes from the federation config (``[records]``, ``max_update_norm``, strategy), the enrolment
registry, the site certificates' regions as the coordinator recorded them at Join, and the store's ledger of
accepted updates. A value the operator has not set is reported as ``NOT SET`` with the config field to fill in;
nothing is invented.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.config import FederationConfig
from coordinator.trust.enrolment import EnrolmentError, load_registry

WHAT_LEAVES = ("LoRA adapter deltas only: safetensors tensors of the agreed adapter spec (exact keys, shapes, "
               "dtypes, finite), signed per update, plus allow-listed aggregate training metrics; never training "
               "records")


def _unset(field: str) -> str:
    return f"NOT SET (set {field} in federation.toml)"


def site_regions(cfg: FederationConfig, joined: Mapping[str, str]) -> dict[str, str]:
    """Each site's data region as its certificate states it; sites with no known region are left out.

    In order: the region the coordinator read from the site's certificate when it joined (``joined``: the store's
    ``site_regions()``), else the enrolment registry's record of the certificate issued to it (``enroll-site
    --region``), else the config's ``publish.site_regions`` (for a federation run without an enrolment registry).
    One function, so the model card, ``sites`` and the record of processing cannot disagree.
    """
    registry = {}
    if cfg.enrolment_registry is not None:
        try:
            registry = load_registry(cfg.enrolment_registry)
        except EnrolmentError:  # a missing/damaged registry refuses every site elsewhere; here it just names no region
            registry = {}
    out = {k: v for k, v in cfg.publish.site_regions.items() if v}
    out.update({name: e.region for name, e in registry.items() if getattr(e, "region", "")})
    out.update({k: v for k, v in joined.items() if v})
    return dict(sorted(out.items()))


def base_model_reference(cfg: FederationConfig) -> str:
    """The base model's reference for anything published: the configured ``base_model_ref`` (hub id or name),
    else the base directory's own name; never a path of this host."""
    return cfg.base_model_ref or Path(cfg.base_model).name


def build_record(cfg: FederationConfig) -> dict[str, Any]:
    """Collect the record of processing as plain data (JSON-ready)."""
    rec = cfg.records
    registry = {}
    if cfg.enrolment_registry is not None:
        try:
            registry = load_registry(cfg.enrolment_registry)
        except EnrolmentError:
            registry = {}
    joined_regions: dict[str, str] = {}
    ledger: list[dict[str, Any]] = []
    epsilon: dict[str, float] = {}
    joined: set[str] = set()
    if (Path(cfg.state_dir) / "coordinator.db").exists():
        from coordinator.rounds.store import Store

        store = Store(cfg.state_dir)
        try:
            joined_regions = store.site_regions()
            joined = {s["name"] for s in store.sites()}
            ledger = store.ledger()
            epsilon = store.site_epsilon()
        finally:
            store.close()
    regions = site_regions(cfg, joined_regions)
    names = sorted(set(registry) | joined | set(regions))
    coordinator_region = rec.coordinator_region or _unset("[records].coordinator_region")
    sites, transfers = [], []
    for name in names:
        region = regions.get(name) or "unknown (no region in certificate or registry)"
        status = ("revoked" if name in registry and registry[name].revoked_ms
                  else "enrolled" if name in registry else "joined" if name in joined else "listed")
        mine = [row for row in ledger if row["site"] == name]
        sites.append({"name": name, "region": region, "status": status, "joined": name in joined,
                      "updates_accepted": len(mine), "epsilon_reported": epsilon.get(name, 0.0)})
        transfers.append({"from_site": name, "from_region": region, "to": "coordinator",
                          "to_region": coordinator_region, "data": WHAT_LEAVES, "updates": len(mine),
                          "bytes": sum(int(r["bytes"]) for r in mine)})
    sa_on = cfg.secure_aggregation.enabled
    eps_by_site = {s["name"]: s["epsilon_reported"] for s in sites}
    return {
        "record": "GDPR Art. 30 record of processing activities",
        "generated_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "federation_id": cfg.federation_id,
        "parties": [{"role": "coordinator operator (controller)",
                     "name": rec.controller or _unset("[records].controller"), "region": coordinator_region},
                    *({"role": "site (data stays on site)", "name": s["name"], "region": s["region"],
                       "status": s["status"]} for s in sites)],
        "purposes": list(rec.purposes) or [_unset("[records].purposes")],
        "data_categories": list(rec.data_categories) or [_unset("[records].data_categories")],
        "data_subjects": list(rec.data_subjects) or [_unset("[records].data_subjects")],
        "recipients": list(rec.recipients) or [_unset("[records].recipients")],
        "base_model": base_model_reference(cfg),
        "transfers": transfers,
        "safeguards": {
            "transport": "gRPC over mutual TLS; every party holds a certificate of the federation CA",
            "identity": "site identity only from its certificate; enrolment registry and signed CRL enforced"
                        if cfg.enrolment_registry or cfg.crl else "site identity only from its certificate",
            "update_signatures": "Ed25519 over round, site, base-model hash, payload SHA-256 and nonce",
            "ingress_validation": "signature, replay, round, payload hash, keys, shapes, dtypes, finiteness, size"
                                  + (f", L2 norm <= {cfg.max_update_norm:g}" if cfg.max_update_norm else ""),
            "differential_privacy": ({n: e for n, e in eps_by_site.items()} if any(eps_by_site.values())
                                     else "not applied (every site reports epsilon 0)"),
            "dp_mode": (f"{cfg.privacy.mode}: clip {cfg.privacy.clip_norm:g}, noise multiplier "
                        f"{cfg.privacy.noise_multiplier:g}, delta {cfg.privacy.delta:g}"
                        if cfg.privacy.mode != "none" else "none"),
            "secure_aggregation": "on" if sa_on else "off",
            "audit": "hash-chained audit logs at the coordinator and at every site",
            "aggregation_strategy": cfg.strategy,
        },
        "retention": ({"updates_and_audit_logs_days": rec.retention_days} if rec.retention_days
                      else _unset("[records].retention_days")),
    }


def to_markdown(record: dict[str, Any]) -> str:
    """Render :func:`build_record`'s output as a markdown document."""
    out = [f"# Record of processing: federation `{record['federation_id']}`", "",
           f"_{record['record']}, generated {record['generated_utc']}._", "", "## Parties", "",
           "| role | name | region | status |", "|---|---|---|---|"]
    for p in record["parties"]:
        out.append(f"| {p['role']} | {p['name']} | {p['region']} | {p.get('status', '')} |")
    for title, key in (("Purposes", "purposes"), ("Categories of personal data", "data_categories"),
                       ("Data subjects", "data_subjects"), ("Recipients", "recipients")):
        out += ["", f"## {title}", "", *(f"- {v}" for v in record[key])]
    out += ["", "## Transfers", "", "| from site | from region | to | to region | updates | bytes |",
            "|---|---|---|---|---|---|"]
    for t in record["transfers"]:
        out.append(f"| {t['from_site']} | {t['from_region']} | {t['to']} | {t['to_region']} | {t['updates']} | "
                   f"{t['bytes']} |")
    out += ["", f"What is transferred: {WHAT_LEAVES}.", "", "## Safeguards", ""]
    for k, v in record["safeguards"].items():
        if isinstance(v, dict):
            v = ", ".join(f"{n}: ε={e:g}" for n, e in v.items())
        out.append(f"- **{k.replace('_', ' ')}**: {v}")
    ret = record["retention"]
    out += ["", "## Retention", "",
            f"- updates and audit logs: {ret['updates_and_audit_logs_days']} days" if isinstance(ret, dict)
            else f"- {ret}", ""]
    return "\n".join(out)
