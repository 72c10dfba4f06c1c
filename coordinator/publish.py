"""Publishing: write the federation's model to a versioned registry directory with full provenance.

Layout of ``<registry>/<federation_id>/v<N>/``::

    adapter/      PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
    merged/       the base with the adapter merged in: a plain HF model directory + tokenizer
    provenance.json   sites, rounds, strategy, update hashes, metrics, base-model hash, epsilon
    fedbridge-manifest.json   SHA-256 of every file above

``PeftModel.from_pretrained(base, v<N>/adapter)`` and ``AutoModelForCausalLM.from_pretrained(v<N>/merged)`` load it.
The directory is built under a temporary name and renamed, so a crash never leaves a half-written version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from coordinator.adapter import peft_model_with
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.manifest import Manifest

log = logging.getLogger(__name__)


def next_version(fed_dir: Path) -> int:
    versions = [int(p.name[1:]) for p in fed_dir.glob("v*") if p.name[1:].isdigit()]
    return max(versions, default=0) + 1


def publish(*, base_model: Path, spec: pb.AdapterSpec, state: dict[str, torch.Tensor], registry_dir: Path,
            federation_id: str, provenance: dict[str, Any], base_model_ref: str = "") -> tuple[int, Path, str]:
    """Write a new version; returns ``(version, path, manifest_sha256)``."""
    from transformers import AutoTokenizer

    fed_dir = Path(registry_dir) / federation_id
    fed_dir.mkdir(parents=True, exist_ok=True)
    version = next_version(fed_dir)
    final = fed_dir / f"v{version}"
    tmp = fed_dir / f".v{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(base_model)

    model = peft_model_with(base_model, spec, state, base_model_ref)
    model.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    tokenizer.save_pretrained(tmp / "merged")
    (tmp / "provenance.json").write_text(json.dumps({"version": version, **provenance}, indent=1, sort_keys=True) + "\n")
    manifest = Manifest.of_dir(tmp)
    manifest.save(tmp)
    os.replace(tmp, final)
    log.info("[Publish] federation=%s version=%d path=%s", federation_id, version, final)
    return version, final, manifest.sha256
