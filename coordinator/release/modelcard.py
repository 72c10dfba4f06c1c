"""The published model card: ``README.md`` with Hugging Face model-card metadata (YAML front matter) and prose.

Everything on the card comes from the version's provenance (:func:`coordinator.release.publish.build_provenance`), so the
card and ``provenance.json`` cannot disagree. Standard Hub keys (``license``, ``base_model``, ``library_name``,
``tags``, ``model-index`` with the eval results) sit at the top level; fedbridge's own facts sit under ``fedbridge``:
base-model hash, federation, version, sites with region and rounds, strategy with its aggregation-error meter,
training modes, DP epsilon per site, evaluation and release gate.
"""

from __future__ import annotations

from typing import Any

import yaml


def card_metadata(prov: dict[str, Any]) -> dict[str, Any]:
    """The YAML metadata block of the card."""
    lic = prov.get("license", {})
    ev = prov.get("evaluation", {})
    meta: dict[str, Any] = {"license": lic.get("license", "other")}
    if meta["license"] == "other":
        meta["license_name"] = lic.get("license_name") or "unspecified"
        if lic.get("license_link"):
            meta["license_link"] = lic["license_link"]
    base = prov["base_model"]
    # The Hub's ``base_model`` key must be a hub id: name it only when the operator configured the reference
    # (base_model_ref); a reference that is only the base directory's name stays under ``fedbridge`` with its hash.
    if base.get("ref") and base.get("configured", True):
        meta["base_model"] = base["ref"]
    meta.update({
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["fedbridge", "federated-learning", "lora", "peft"],
    })
    primary = ev.get("primary_metrics", {})
    results = [{"task": {"type": "text-generation"}, "dataset": {"name": b, "type": b},
                "metrics": [{"type": primary.get(b, "score"), "value": kv["score"], "name": f"{b} {primary.get(b, 'score')}"}]}
               for b, kv in ev.get("benchmarks", {}).items()]
    if results:
        meta["model-index"] = [{"name": f"{prov['federation_id']}-v{prov['version']}", "results": results}]
    meta["fedbridge"] = {
        "federation": prov["federation_id"],
        "version": prov["version"],
        "base_model": {"ref": base["ref"], "manifest_sha256": base["manifest_sha256"]},
        "global_adapter_sha256": prov["global_adapter_sha256"],
        "adapter_alone_is_the_model": prov.get("adapter", {}).get("reproduces_merged_on_plain_base", True),
        "sites": [{"name": c["name"], "region": c["region"], "rounds": c["rounds"]} for c in prov["contributors"]],
        "rounds": len(prov["rounds"]),
        "strategy": {"name": prov["strategy"]["name"], "params": prov["strategy"]["params"],
                     "aggregation_error": prov["strategy"]["aggregation_error"]["final_round"],
                     "aggregation_error_max": prov["strategy"]["aggregation_error"]["final_round_max"]},
        "training_modes": prov["training"]["modes"],
        "dp_epsilon": {c["name"]: c["dp_epsilon"] for c in prov["contributors"]},
        "dp": {k: v for k, v in prov["privacy"].items() if k in ("mode", "unit", "delta", "central")},
        "evaluation": {"round": ev.get("round"), "status": ev.get("status", "disabled"),
                       "scores": ev.get("scores", {})} if ev.get("enabled") else {"status": "disabled"},
        "release_gate": {"passed": prov["release_gate"]["passed"], "thresholds": prov["release_gate"]["thresholds"],
                         "max_regression": prov["release_gate"]["max_regression"],
                         "previous_version": prov["release_gate"]["previous_version"]},
        "license": {k: v for k, v in lic.items() if v and (k != "license_name" or meta["license"] == "other")},
    }
    if prov.get("withdrawal"):
        w = prov["withdrawal"]
        meta["fedbridge"]["withdrawal"] = {"site": w["site"], "from_round": w["from_round"], "to_round": w["to_round"]}
    return meta


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_model_card(prov: dict[str, Any]) -> str:
    """``README.md`` text: YAML front matter, then the card for people."""
    meta = card_metadata(prov)
    fb = meta["fedbridge"]
    ev = prov.get("evaluation", {})
    lines = [f"# {prov['federation_id']} v{prov['version']}", "",
             f"A LoRA fine-tune of `{fb['base_model']['ref'] or 'unspecified'}` trained by federation "
             f"`{prov['federation_id']}` with fedbridge: {len(fb['sites'])} site(s) trained on their own data and sent "
             f"only adapter deltas; the coordinator aggregated them with `{fb['strategy']['name']}` over "
             f"{fb['rounds']} round(s).", "",
             "## Base model", "",
             f"- reference: `{fb['base_model']['ref'] or 'unspecified'}`"
             + ("" if prov["base_model"].get("configured", True) else " (the base directory's name; the federation "
                "set no base_model_ref)"),
             f"- manifest SHA-256 (every file of the base directory): `{fb['base_model']['manifest_sha256']}`",
             f"- global adapter SHA-256: `{fb['global_adapter_sha256']}`"]
    if prov.get("base_residual"):
        lines.append(f"- base residual: `{prov['base_residual']['file']}` (SHA-256 `{prov['base_residual']['sha256']}`); "
                     "the adapter applies to base + residual, `merged/` already includes it")
    lines += ["",
              "## Sites", "", "| site | region | rounds | DP ε |", "|---|---|---|---:|"]
    lines += [f"| {s['name']} | {s['region']} | {', '.join(map(str, s['rounds']))} | {fb['dp_epsilon'][s['name']]:g} |"
              for s in fb["sites"]]
    lines += ["", f"ε: {prov['privacy']['epsilon_accounting']}; 0 means no differential privacy was applied to that "
              f"site's updates. Privacy unit: {prov['privacy'].get('unit', 'site-level')}."]
    central = prov["privacy"].get("central")
    if central:
        lines += ["", f"Central DP: the coordinator clipped each update to L2 norm {central['clip_norm']:g} and added "
                      f"Gaussian noise (multiplier {central['noise_multiplier']:g}) to the mean over {central['rounds']} "
                      f"round(s): ε = {central['epsilon']:.4g} at δ = {central['delta']:g} for the published model."]
    lines += ["",
              "## Training and aggregation", "",
              f"- training modes: {', '.join(fb['training_modes'])}",
              f"- strategy: `{fb['strategy']['name']}` {fb['strategy']['params'] or ''}".rstrip(),
              "- aggregation error (mean over LoRA modules of ||mean(B_i A_i) - B A|| / ||mean(B_i A_i)||), by round: "
              + ", ".join(f"{r}: {_fmt(v)}" for r, v in prov["strategy"]["aggregation_error"]["per_round"].items()),
              "", "| round | input global | output global | site updates (payload SHA-256) |", "|---|---|---|---|"]
    lines += [f"| {e['round']} | `{e['input_sha256'][:12]}` | `{(e['output_sha256'] or '')[:12]}` | "
              + ", ".join(f"{u['site']} `{u['payload_sha256'][:12]}`" for u in e["updates"]) + " |"
              for e in prov["ledger"]]
    if prov.get("withdrawal"):
        w = prov["withdrawal"]
        lines += ["", "## Withdrawn site", "",
                  f"Site `{w['site']}` was withdrawn{': ' + w['reason'] if w.get('reason') else ''}. Its updates were "
                  f"removed and rounds {w['from_round']}..{w['to_round']} were re-aggregated with the same strategy from "
                  "the other sites' stored updates; the table above shows the rebuilt globals.", "", w["limits"]]
    lines += ["", "## Evaluation", ""]
    if not ev.get("enabled"):
        lines += ["No shared evaluation was configured for this federation."]
    else:
        lines += [f"{ev['framework']}, on the global model after round {ev['round']} (status: {ev['status']}"
                  + (f": {ev['error']}" if ev.get("error") else "") + ").", "",
                  "| benchmark | metric | score | per subset |", "|---|---|---:|---|"]
        for b, kv in ev.get("benchmarks", {}).items():
            subsets = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in kv.items() if k.startswith("subset/"))
            lines.append(f"| {b} | {ev.get('primary_metrics', {}).get(b, 'score')} | {kv['score']:.4f} | {subsets} |")
        if ev.get("history"):
            names = sorted({b for s in ev["history"].values() for b in s})
            lines += ["", "| round | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            lines += [f"| {r} | " + " | ".join(_fmt(s.get(b, "")) for b in names) + " |" for r, s in ev["history"].items()]
    gate = prov["release_gate"]
    lines += ["", "## Release gate", "",
              (f"Passed: thresholds {gate['thresholds']}, largest allowed regression {gate['max_regression']} against "
               f"{'v' + str(gate['previous_version']) if gate['previous_version'] else 'no earlier version'}.")
              if gate["thresholds"] else "No release gate was configured.",
              "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("merged")'
              + ("" if not fb["adapter_alone_is_the_model"] else '  # or: PeftModel.from_pretrained(base, "adapter")'),
              'tokenizer = AutoTokenizer.from_pretrained("merged")', "```", "",
              *([f"**{prov['adapter']['note']}** See `adapter/README.md`.", ""]
                if not fb["adapter_alone_is_the_model"] else []),
              "`SHA256SUMS` lists every file (`sha256sum -c SHA256SUMS`); `provenance.json` holds the full record.", "",
              "## Licence", "", f"`{meta['license']}`" + (f" ({meta.get('license_name')})" if "license_name" in meta else "")
              + (f", {meta['license_link']}" if meta.get("license_link") else "") + "."]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=120)
    return f"---\n{front}---\n\n" + "\n".join(lines) + "\n"


def parse_model_card(text: str) -> tuple[dict[str, Any], str]:
    """Split a card into its metadata and its markdown body."""
    if not text.startswith("---\n"):
        raise ValueError("model card has no YAML front matter")
    front, sep, body = text[4:].partition("\n---\n")
    if not sep:
        raise ValueError("model card's YAML front matter is not closed")
    return yaml.safe_load(front), body
