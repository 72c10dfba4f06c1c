"""``fedbridge-site preflight``: check a site kit end to end before the first round, as a pass/fail table.

Checks, in order: the site policy, the certificates (they chain to the federation CA, are in date, and the key
matches), the envelope signing key, the coordinator (an mTLS handshake), the base model (against the policy's
allowed hashes when it names any), the private data files (whole-file validation), free disk in the work
directory, the GPU (reported; required only when asked), and one dry LoRA training step on synthetic data.
Nothing leaves the site except the TLS handshake.
"""

from __future__ import annotations

import datetime
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from site_agent.config import SiteConfig

MIN_FREE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Check:
    """One row of the preflight table."""

    name: str
    ok: bool
    detail: str


def _policy(cfg: SiteConfig) -> str:
    from site_agent.policy import check_coordinator, load_policy

    policy = load_policy(cfg.policy)
    check_coordinator(policy, cfg.coordinator, cfg.tls.ca.read_bytes())
    return "no policy.toml: permissive defaults" if cfg.policy is None else f"{cfg.policy} loaded, coordinator trusted"


def _certificates(cfg: SiteConfig) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate(cfg.tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(f"the site certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                         f"{cert.not_valid_after_utc:%Y-%m-%d})")
    key = serialization.load_pem_private_key(cfg.tls.key.read_bytes(), password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
            serialization.Encoding.DER, pub):
        raise ValueError("the TLS key does not match the site certificate")
    days = (cert.not_valid_after_utc - now).days
    return f"chains to the CA, key matches, {days} days left"


def _signing_key(cfg: SiteConfig) -> str:
    from site_agent.agent import load_signing_key

    load_signing_key(cfg.tls.signing_key)
    return "Ed25519"


def _coordinator(cfg: SiteConfig, timeout_s: float) -> str:
    import grpc

    from site_agent.client import CoordinatorClient

    client = CoordinatorClient(cfg)
    try:
        grpc.channel_ready_future(client.channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ValueError(f"no mTLS connection to {cfg.coordinator} within {timeout_s:g} s") from None
    finally:
        client.close()
    return f"{cfg.coordinator}: mTLS handshake ok"


def _base_model(cfg: SiteConfig) -> str:
    from fedcommon.manifest import Manifest
    from site_agent.policy import load_policy

    sha = Manifest.of_dir(cfg.base_model).sha256
    allowed = load_policy(cfg.policy).allowed_base_models
    if allowed and sha not in allowed:
        raise ValueError(f"manifest {sha[:16]}… is not one of the policy's allowed base models")
    from transformers import AutoTokenizer

    from site_agent.training.masking import check_template

    # Training and scoring mark assistant tokens from the base's own chat template: refuse one they cannot use.
    check_template(AutoTokenizer.from_pretrained(cfg.base_model))
    return f"manifest {sha[:16]}…" + (" (allowed by policy)" if allowed else "") + ", chat template ok"


def _data(cfg: SiteConfig) -> str:
    from site_agent.training.data import load_jsonl, load_sft

    train = load_jsonl(cfg.data.train)
    heldout = load_sft(cfg.data.heldout) if cfg.data.heldout else []
    return f"{len(train)} training rows, {len(heldout)} held-out rows"


def _disk(cfg: SiteConfig) -> str:
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cfg.work_dir).free
    if free < MIN_FREE_BYTES:
        raise ValueError(f"{free / 1024**3:.1f} GiB free in {cfg.work_dir}, need {MIN_FREE_BYTES / 1024**3:.0f} GiB")
    return f"{free / 1024**3:.1f} GiB free"


def _gpu(require: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    if require:
        raise ValueError("a GPU is required but torch sees none")
    return "none (CPU training)"


def _dry_step(cfg: SiteConfig) -> str:
    """One LoRA forward/backward/update on a synthetic chat row: the model, tokenizer and training stack work."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from fedcommon.models import load_base, lora_config_for

    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    # The same loader as training (float32; the task, not site.toml, decides on 4-bit), with a small probe adapter.
    model = get_peft_model(load_base(cfg.base_model), lora_config_for(4, 8, 0.0, "all-linear"))
    messages = [{"role": "user", "content": "Preflight: what is two plus two?"}, {"role": "assistant", "content": "4"}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    if not torch.isfinite(loss):
        raise ValueError("the dry step's loss is not finite")
    return f"loss {float(loss):.3f}, {time.perf_counter() - start:.2f} s"


def run_preflight(cfg: SiteConfig, connect_timeout_s: float = 5.0, require_gpu: bool = False,
                  dry_step: bool = True) -> list[Check]:
    """Run every check, each independently (one failure does not hide the others); return the table rows."""
    checks: list[tuple[str, Callable[[], str]]] = [
        ("policy", lambda: _policy(cfg)),
        ("certificates", lambda: _certificates(cfg)),
        ("signing key", lambda: _signing_key(cfg)),
        ("coordinator", lambda: _coordinator(cfg, connect_timeout_s)),
        ("base model", lambda: _base_model(cfg)),
        ("data", lambda: _data(cfg)),
        ("disk", lambda: _disk(cfg)),
        ("gpu", lambda: _gpu(require_gpu)),
    ]
    if dry_step:
        checks.append(("dry training step", lambda: _dry_step(cfg)))
    rows = []
    for name, fn in checks:
        try:
            rows.append(Check(name, True, fn()))
        except Exception as e:  # every failure becomes a row; the messages never hold data values
            rows.append(Check(name, False, f"{type(e).__name__}: {e}"))
    return rows
