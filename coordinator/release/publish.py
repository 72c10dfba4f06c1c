"""Publishing: write the federation's model to a versioned registry directory with full provenance, and push it.

Layout of ``<registry>/<federation_id>/v<N>/``::

    adapter/          PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
    merged/           base + adapter merged layer by layer: model-0000i-of-0000n.safetensors shards, the index,
                      config, generation config, tokenizer
    README.md         model card: YAML metadata (base model + hash, federation, sites/regions/rounds, strategy and
                      its error meter, training modes, DP epsilon per site, eval table, licence) and prose
    provenance.json   everything the card states, plus the per-round ledger of update hashes
    SHA256SUMS        ``sha256sum -c`` format, every file above
    fedbridge-manifest.json   fedbridge's manifest of every file (its hash is recorded in the coordinator's store)

``AutoModelForCausalLM.from_pretrained(v<N>/merged)`` loads the published model; so does
``PeftModel.from_pretrained(base, v<N>/adapter)``, except under FedEx-LoRA: there the adapter applies to base +
``base_residual.safetensors`` (also written, top level), which no LoRA of the agreed rank can carry, so ``adapter/``
says so in its own ``README.md``, its safetensors metadata, the card and ``provenance.json`` (``adapter``).
Nothing published names a path of the coordinator's host (``base_model_name_or_path`` is the base's reference).
The directory is built under a temporary name and renamed, so a crash never leaves a half-written version.
Pushing (:func:`push_version`) uploads a verified version to the Hugging Face Hub or ModelScope and never modifies
the local copy.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from coordinator.config import FederationConfig
from coordinator.release.gate import GateDecision
from coordinator.release.merge import copy_side_files, merge_adapter
from coordinator.release.modelcard import render_model_card
from coordinator.release.records import base_model_reference, site_regions
from coordinator.rounds.store import Store, now_ms
from fedcommon.durable import fsync_dir, write_durable
from fedcommon.manifest import MANIFEST_NAME, Manifest, sha256_file
from protos.fedbridge.v1 import federation_service_pb2 as pb

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS"
PUSH_SCHEMES = {"hf": "huggingface", "modelscope": "modelscope"}


class PushError(RuntimeError):
    """A push to a hub failed; the local version is untouched."""


def next_version(fed_dir: Path) -> int:
    versions = [int(p.name[1:]) for p in fed_dir.glob("v*") if p.name[1:].isdigit()]
    return max(versions, default=0) + 1


def find_published(fed_dir: Path, federation_id: str, round: int, global_sha256: str) -> tuple[int, Path, str] | None:
    """An intact version of ``fed_dir`` that publishes ``round``'s global adapter ``global_sha256``, as
    ``(version, path, manifest_sha256)``; None if there is none.

    Lets a coordinator restarted between writing a version and recording it in its store adopt that version
    instead of publishing the same model twice. A version whose files do not match its ``SHA256SUMS`` is ignored.
    """
    fed_dir = Path(fed_dir)
    for p in sorted(fed_dir.glob("v*"), key=lambda q: int(q.name[1:]) if q.name[1:].isdigit() else -1):
        if not p.name[1:].isdigit() or not (p / "provenance.json").is_file():
            continue
        try:
            prov = json.loads((p / "provenance.json").read_text())
        except (OSError, ValueError):
            continue
        rounds = [r.get("round") for r in prov.get("rounds", [])]
        if (prov.get("federation_id") == federation_id and prov.get("global_adapter_sha256") == global_sha256
                and rounds and rounds[-1] == round and not verify_sha256sums(p)):
            return int(p.name[1:]), p, Manifest.load(p / MANIFEST_NAME).sha256
    return None


# -- provenance ----------------------------------------------------------------------------------------------------
def build_provenance(cfg: FederationConfig, store: Store, *, base_sha256: str, spec: pb.AdapterSpec, strategy: str,
                     global_sha256: str, gate: GateDecision) -> dict[str, Any]:
    """Everything a published version states about where it came from, read from the coordinator's store."""
    final = cfg.rounds
    rounds = [{"round": r.round, "input_sha256": r.input_sha256, "output_sha256": r.output_sha256, **r.info}
              for r in store.rounds()]
    ledger: dict[int, dict[str, Any]] = {}
    site_rounds: dict[str, list[int]] = {}
    for u in store.ledger():
        env = pb.UpdateEnvelope.FromString(u["envelope"])
        entry = ledger.setdefault(u["round"], {"round": u["round"], "input_sha256": u["input_sha256"],
                                               "output_sha256": u["output_sha256"], "updates": []})
        entry["updates"].append({"site": u["site"], "payload_sha256": u["payload_sha256"],
                                 "num_examples": u["num_examples"], "bytes": u["bytes"],
                                 "epsilon_spent": env.epsilon_spent, "dp_delta": env.dp_delta})
        site_rounds.setdefault(u["site"], []).append(u["round"])
    sites = sorted(site_rounds)
    regions = site_regions(cfg, store.site_regions())  # from the site certificates, as enrolled
    # Each envelope carries the site's CUMULATIVE epsilon (its own ledger), so the latest one is the site's total.
    site_dp = store.site_dp()
    epsilon = {s: site_dp[s]["epsilon"] for s in sites}
    runs = {r["round"]: r for r in store.eval_runs()}
    scores = store.eval_scores()
    final_run = runs.get(final)
    evaluation: dict[str, Any] = {"enabled": cfg.evaluation.enabled}
    if cfg.evaluation.enabled:
        final_scores = scores.get(final, {}) if final_run and final_run["status"] == "ok" else {}
        evaluation.update({
            "framework": f"EvalScope {_version('evalscope')}", "round": final,
            "status": final_run["status"] if final_run else "missing", "error": final_run["error"] if final_run else "",
            "scores": {b: kv["score"] for b, kv in sorted(final_scores.items())},
            "primary_metrics": dict(final_run["primary_metrics"]) if final_scores and final_run else {},
            "benchmarks": {b: dict(sorted(kv.items())) for b, kv in sorted(final_scores.items())},
            "history": {str(r): {b: kv["score"] for b, kv in sorted(s.items())} for r, s in sorted(scores.items())
                        if runs.get(r, {}).get("status") == "ok"},
            "spec": [{"name": b.name, "subsets": list(b.subsets), "metrics": list(b.metrics),
                      # the data's own name, not where it lies on the coordinator's host
                      "local_path": Path(b.local_path).name if b.local_path else None}
                     for b in cfg.evaluation.benchmarks],
        })
    last = rounds[-1] if rounds else {}
    return {
        "federation_id": cfg.federation_id,
        # A hub id or name, never this host's path; ``configured`` says whether it is the operator's base_model_ref
        # (a hub id the card's top-level ``base_model`` may name) or only the base directory's own name.
        "base_model": {"ref": base_model_reference(cfg), "manifest_sha256": base_sha256,
                       "configured": bool(cfg.base_model_ref)},
        "adapter_spec": {"rank": spec.rank, "alpha": spec.alpha, "target_modules": list(spec.target_modules),
                         "sha256": spec.sha256},
        "strategy": {"name": strategy, "params": dict(cfg.strategy_params),
                     "aggregation_error": {"final_round": last.get("aggregation_error", {}).get("mean"),
                                           "final_round_max": last.get("aggregation_error", {}).get("max"),
                                           "per_round": {str(r["round"]): r.get("aggregation_error", {}).get("mean")
                                                         for r in rounds}}},
        "training": {"modes": [cfg.training.mode], "max_steps": cfg.training.max_steps,
                     "learning_rate": cfg.training.learning_rate, "batch_size": cfg.training.batch_size},
        "rounds": rounds, "ledger": [ledger[r] for r in sorted(ledger)], "sites": sites,
        "contributors": [{"name": s, "region": regions.get(s, "unspecified"),
                          "rounds": sorted(site_rounds[s]), "dp_epsilon": epsilon[s],
                          "dp_delta": site_dp[s]["delta"]} for s in sites],
        "privacy": _privacy(cfg, rounds, epsilon, {s: site_dp[s]["delta"] for s in sites}),
        "evaluation": evaluation,
        "release_gate": {"thresholds": dict(cfg.gate.thresholds), "max_regression": cfg.gate.max_regression,
                         **gate.to_dict()},
        "license": {"license": cfg.publish.license, "license_name": cfg.publish.license_name,
                    "license_link": cfg.publish.license_link},
        "global_adapter_sha256": global_sha256,
        "published_ms": now_ms(),
    }


def _privacy(cfg: FederationConfig, rounds: list[dict[str, Any]], epsilon: dict[str, float],
             delta: dict[str, float]) -> dict[str, Any]:
    """The card's privacy facts: per-site (local) ε from the sites' signed envelopes, and the central ε if any."""
    from coordinator.privacy.central_dp import ACCOUNTING

    central = [r["dp"] for r in rounds if r.get("dp", {}).get("mode") == "central"]
    out: dict[str, Any] = {
        "transfers": "adapter deltas only", "mode": cfg.privacy.mode,
        "unit": "site-level: each site's whole update per round (DP-FedAvg); no per-example guarantee is claimed",
        "epsilon": epsilon, "delta": delta,
        "epsilon_accounting": "each site's cumulative epsilon as reported in its latest signed envelope (its own "
                              f"ledger); {ACCOUNTING}",
    }
    if central:
        last = central[-1]
        out["central"] = {"epsilon": last["epsilon"], "delta": last["delta"], "rounds": len(central),
                          "noise_multiplier": last["noise_multiplier"], "clip_norm": last["clip_norm"],
                          "accounting": last["accounting"]}
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- the version directory ----------------------------------------------------------------------------------------
def write_sha256sums(root: Path) -> Path:
    """Write ``SHA256SUMS`` (``sha256sum -c`` format) over every file under ``root`` except itself."""
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != SUMS_NAME and p.relative_to(root).as_posix() != SUMS_NAME]
    path = root / SUMS_NAME
    write_durable(path, "".join(lines).encode())
    return path


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files written by libraries that do not fsync themselves)."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted({p.parent for p in Path(root).rglob("*")} | {Path(root)}, key=lambda x: -len(x.parts)):
        fsync_dir(d)


def verify_sha256sums(root: Path) -> list[str]:
    """Files of ``root/SHA256SUMS`` that are missing or differ (empty: the version is intact)."""
    sums = Path(root) / SUMS_NAME
    if not sums.exists():
        return [SUMS_NAME]
    bad = []
    for line in sums.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        p = Path(root) / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


FEDEX_ADAPTER_NOTE = ("adapter/ alone is not the published model under FedEx-LoRA: it applies to base + "
                      "base_residual.safetensors. Load merged/, or add base_residual.safetensors to the base weights "
                      "and then load this adapter.")


def _fedex_adapter_readme() -> str:
    return "\n".join([
        "# adapter/: not the published model on its own", "",
        "This federation aggregated with FedEx-LoRA, which folds a residual (mean(B_i A_i) - mean(B) mean(A), summed "
        "over the rounds) into the base weights. The residual is a full-rank matrix per layer, so no LoRA adapter of "
        "the agreed rank can carry it: this adapter applies to **base + `../base_residual.safetensors`**, not to the "
        "plain base.", "",
        "- To use the published model, load `../merged/` (it already includes the residual).",
        "- To use this adapter, first add each tensor of `../base_residual.safetensors` to the base weight of the "
        "same name (in that weight's own layout), then `PeftModel.from_pretrained(base, \"adapter\")`:", "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "from transformers import AutoModelForCausalLM",
        "base = AutoModelForCausalLM.from_pretrained(BASE)",
        "params = dict(base.named_parameters())",
        "with torch.no_grad():",
        "    for name, value in load_file(\"base_residual.safetensors\").items():",
        "        params[name].add_(value.to(params[name].dtype))",
        "model = PeftModel.from_pretrained(base, \"adapter\")",
        "```", ""])


def _write_adapter(out: Path, base_model: Path, spec: pb.AdapterSpec, state: dict[str, torch.Tensor],
                   base_model_ref: str, *, fedex_residual: bool = False) -> None:
    """PEFT's saved-adapter layout without building a model: adapter_config.json + adapter_model.safetensors.

    ``base_model_ref`` goes into ``base_model_name_or_path`` (a hub id or name, never this host's path). With
    ``fedex_residual`` the adapter is labelled as not the published model on its own (see :data:`FEDEX_ADAPTER_NOTE`):
    in its safetensors metadata and in ``adapter/README.md``.
    """
    from safetensors.torch import save_file

    from coordinator.rounds.adapter import base_layout
    from fedcommon.models import lora_config

    config = lora_config(spec)
    config.base_model_name_or_path = base_model_ref or Path(base_model).name
    config.inference_mode = True
    # PEFT switches fan_in_fan_out on by itself for Conv1D targets (GPT-2), with a warning; say it up front.
    conv1d = base_layout(Path(base_model)).fan_in_fan_out
    config.fan_in_fan_out = any(f"{t}.weight" in conv1d for t in spec.target_modules)
    config.save_pretrained(str(out))
    metadata = {"format": "pt", **({"fedbridge_note": FEDEX_ADAPTER_NOTE} if fedex_residual else {})}
    save_file({k: v.detach().contiguous() for k, v in sorted(state.items())}, str(out / "adapter_model.safetensors"),
              metadata=metadata)
    copy_side_files(base_model, out, only_tokenizer=True)
    if fedex_residual:
        (out / "README.md").write_text(_fedex_adapter_readme(), encoding="utf-8")


def publish(*, base_model: Path, spec: pb.AdapterSpec, state: dict[str, torch.Tensor], registry_dir: Path,
            federation_id: str, provenance: dict[str, Any], base_model_ref: str = "",
            max_shard_bytes: int = 2 << 30, residual: dict[str, torch.Tensor] | None = None) -> tuple[int, Path, str]:
    """Write a new version; returns ``(version, path, manifest_sha256)``.

    ``residual`` (FedEx-LoRA) is folded into ``merged/`` and also written as ``base_residual.safetensors``: the
    adapter then applies to ``base + residual``, which the card says.
    """
    fed_dir = Path(registry_dir) / federation_id
    fed_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(fed_dir)
    final = fed_dir / f"v{version}"
    tmp = fed_dir / f".v{version}.tmp-{os.getpid()}"
    for stale in fed_dir.glob(".v*.tmp-*"):  # left by a publisher killed mid-write; never renamed, never complete
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    prov = {"version": version, **provenance,
            "adapter": {"reproduces_merged_on_plain_base": not residual,
                        **({"note": FEDEX_ADAPTER_NOTE} if residual else {})}}
    ref = base_model_ref or provenance.get("base_model", {}).get("ref") or Path(base_model).name
    _write_adapter(tmp / "adapter", Path(base_model), spec, state, ref, fedex_residual=bool(residual))
    merge_adapter(Path(base_model), spec, state, tmp / "merged", max_shard_bytes=max_shard_bytes, residual=residual)
    if residual:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sorted(residual.items())}, str(tmp / "base_residual.safetensors"),
                  metadata={"format": "pt"})
        prov["base_residual"] = {"file": "base_residual.safetensors", "sha256": sha256_file(tmp / "base_residual.safetensors"),
                                 "note": "the adapter applies to base + this residual; merged/ already includes it"}
    write_durable(tmp / "provenance.json", (json.dumps(prov, indent=1, sort_keys=True) + "\n").encode())
    write_durable(tmp / "README.md", render_model_card(prov).encode("utf-8"))
    write_sha256sums(tmp)
    manifest = Manifest.of_dir(tmp)
    manifest.save(tmp)
    fsync_tree(tmp)  # the weights and the manifest too: after the rename below, a power cut must not leave holes
    os.replace(tmp, final)
    fsync_dir(fed_dir)
    log.info("[Publish] federation=%s version=%d path=%s", federation_id, version, final)
    return version, final, manifest.sha256


# -- pushing to a hub ---------------------------------------------------------------------------------------------
def parse_target(target: str) -> tuple[str, str]:
    """``hf://org/name`` or ``modelscope://org/name`` -> ``(hub, "org/name")``."""
    scheme, sep, repo = target.partition("://")
    if not sep or scheme not in PUSH_SCHEMES or repo.count("/") != 1 or not all(repo.split("/")):
        raise PushError(f"push target {target!r} must be hf://<org>/<name> or modelscope://<org>/<name>")
    return PUSH_SCHEMES[scheme], repo


def push_version(version_dir: Path, target: str, *, token: str | None = None, private: bool = True) -> str:
    """Upload a published version to the Hugging Face Hub or ModelScope; returns the repository's URL.

    The version's ``SHA256SUMS`` is verified first (a damaged version is never pushed). The hub libraries are
    imported only here. Offline, or on any hub error, :class:`PushError` says so; the local files are only read.

    Raises:
        PushError: Bad target, damaged or missing version, missing library, offline, or the hub refused.
    """
    from coordinator.release.evaluation import hub_reachable

    hub, repo = parse_target(target)
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise PushError(f"{version_dir} is not a published version")
    bad = verify_sha256sums(version_dir)
    if bad:
        raise PushError(f"{version_dir} does not match its {SUMS_NAME} (e.g. {bad[0]}); refusing to push it")
    intact = f"The local version at {version_dir} is intact."
    if not hub_reachable(hub):
        raise PushError(f"cannot reach {hub} (offline or no route to its host); nothing was pushed. {intact}")
    message = f"fedbridge: {version_dir.parent.name} {version_dir.name}"
    try:
        if hub == "huggingface":
            try:
                from huggingface_hub import HfApi
            except ImportError as e:
                raise PushError(f"huggingface_hub is not installed ({e}): pip install huggingface_hub. {intact}") from e
            api = HfApi(token=token)
            api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(version_dir), repo_type="model", commit_message=message,
                              ignore_patterns=["fedbridge-manifest.json"])
            return f"https://huggingface.co/{repo}"
        try:
            from modelscope.hub.api import HubApi
        except ImportError as e:
            raise PushError(f"modelscope is not installed ({e}): pip install modelscope. {intact}") from e
        ms = HubApi()
        if token:
            ms.login(token)
        ms.create_repo(repo, repo_type="model", visibility="private" if private else "public", exist_ok=True)
        ms.upload_folder(repo_id=repo, folder_path=str(version_dir), commit_message=message)
        return f"https://www.modelscope.cn/models/{repo}"
    except PushError:
        raise
    except Exception as e:  # network, auth, quota: the hub libraries raise many types
        raise PushError(f"push to {target} failed: {type(e).__name__}: {str(e)[:300]}. {intact}") from e
