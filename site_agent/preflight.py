"""``fedbridge-site preflight``: check a site kit end to end before the first round, as a pass/fail table.

Checks, in order: the site policy, the certificates (they chain to the federation CA, are in date, and the key
matches), the envelope signing key, the coordinator (an mTLS handshake), the base model (against the policy's
allowed hashes when it names any), the private data files (whole-file validation), free disk in the work
directory, the GPU (reported; required only when asked), and one real training step: the very trainer ``run``
builds for the federation's mode, with the federation's chat template and the project's assistant masks, on the
site's own training file, so preflight fails exactly where ``run`` would. Nothing leaves the site except the TLS
handshake.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from site_agent.config import SiteConfig

MIN_FREE_BYTES = 2 * 1024**3


class DataProblems(ValueError):
    """Bad rows in the training file, the held-out file or both: every reported one, one ``file:line`` per line."""


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


def preflight_mode(cfg: SiteConfig, mode: str | None) -> str:
    """The training mode preflight checks: ``mode`` if given, else the policy's only allowed mode, else ``sft``.

    The site learns the federation's mode only from its first task; an operator who knows it passes ``--mode``.

    Raises:
        ValueError: ``mode`` is one the site's policy does not allow (``run`` would refuse the task).
    """
    from site_agent.policy import load_policy

    allowed = load_policy(cfg.policy).allowed_modes
    if mode is None:
        return allowed[0] if len(allowed) == 1 else "sft"
    if mode not in allowed:
        raise ValueError(f"mode {mode!r} is not one of the policy's allowed_modes {list(allowed)}")
    return mode


def _template_text(chat_template: Path | None) -> str:
    from site_agent.training.masking import TemplateError, read_template_file

    try:
        return read_template_file(chat_template) if chat_template is not None else ""
    except TemplateError as e:
        raise ValueError(str(e)) from None


def _base_model(cfg: SiteConfig, mode: str = "sft", chat_template: Path | None = None) -> str:
    from fedcommon.manifest import Manifest
    from site_agent.policy import load_policy

    sha = Manifest.of_dir(cfg.base_model).sha256
    allowed = load_policy(cfg.policy).allowed_base_models
    if allowed and sha not in allowed:
        raise ValueError(f"manifest {sha[:16]}… is not one of the policy's allowed base models")
    from transformers import AutoTokenizer

    from site_agent.training.masking import apply_chat_template_text, check_template

    # Training and scoring mark assistant tokens from the chat template (the federation's, else the base's own):
    # refuse one they cannot use. Preference modes may train on plain strings, which need none (the step tells).
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    text = _template_text(chat_template)
    if text:
        apply_chat_template_text(tokenizer, text)
    elif mode in ("sft", "qlora"):
        check_template(tokenizer)
    return f"manifest {sha[:16]}…" + (" (allowed by policy)" if allowed else "") + \
        (", chat template ok" if text or mode in ("sft", "qlora") else "")


def _data(cfg: SiteConfig, mode: str = "sft") -> str:
    """Both files read as ``run`` reads them (the training file in ``mode``'s format); every bad row of both listed."""
    from site_agent.training.data import DataError, load_for_mode, load_sft

    counts, errors = [], []
    for what, load in (("training", lambda p: load_for_mode(p, mode)), ("held-out", load_sft)):
        path = cfg.data.train if what == "training" else cfg.data.heldout
        if path is None:
            counts.append(f"0 {what} rows")
            continue
        try:
            counts.append(f"{len(load(path))} {what} rows")
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataProblems("\n".join(errors))
    return ", ".join(counts)


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


def _train_step(cfg: SiteConfig, mode: str, chat_template: Path | None) -> str:
    """One optimizer step of the trainer ``run`` builds for ``mode``, on the site's own training file.

    Same data loading and format check, same chat template and assistant masks, same TRL trainer; only the task is
    a local one (one step, batch 1, a fresh rank-4 all-linear adapter). Nothing is sent anywhere.
    """
    import math

    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.agent import make_trainer
    from site_agent.training.masking import template_sha256

    text = _template_text(chat_template)
    with tempfile.TemporaryDirectory(prefix="preflight-") as work:
        start = time.perf_counter()
        # The pin is the supplied template's own hash, or none: the base's own template is pinned by its manifest.
        trainer = make_trainer(mode, cfg.base_model, cfg.data.train, Path(work), 0, cfg.deepspeed, text,
                               template_sha256(text))
        spec, state = trainer.probe_adapter()
        task = pb.Task(federation_id="preflight", round=1, total_rounds=1, adapter_spec=spec, training=pb.TrainingConfig(
            mode=mode, max_steps=1, learning_rate=1e-4, per_device_batch_size=1, gradient_accumulation_steps=1,
            max_length=512))
        result = trainer.train_round(task, state)
    if not math.isfinite(result.train_loss):
        raise ValueError("the training step's loss is not finite")
    return f"{mode}: loss {result.train_loss:.3f}, {time.perf_counter() - start:.1f} s"


def run_preflight(cfg: SiteConfig, connect_timeout_s: float = 5.0, require_gpu: bool = False,
                  dry_step: bool = True, mode: str | None = None, chat_template: Path | None = None) -> list[Check]:
    """Run every check, each independently (one failure does not hide the others); return the table rows.

    Args:
        mode: The federation's training mode (None: see :func:`preflight_mode`).
        chat_template: The federation's chat template file, when it supplies one (``[model] chat_template``).
    """
    try:
        mode = preflight_mode(cfg, mode)
    except Exception as e:  # a bad policy file or a mode it refuses: one failed row, the rest still run
        return [Check("mode", False, f"{type(e).__name__}: {e}")]
    checks: list[tuple[str, Callable[[], str]]] = [
        ("policy", lambda: _policy(cfg)),
        ("certificates", lambda: _certificates(cfg)),
        ("signing key", lambda: _signing_key(cfg)),
        ("coordinator", lambda: _coordinator(cfg, connect_timeout_s)),
        ("base model", lambda: _base_model(cfg, mode, chat_template)),
        ("data", lambda: _data(cfg, mode)),
        ("disk", lambda: _disk(cfg)),
        ("gpu", lambda: _gpu(require_gpu)),
    ]
    if dry_step:
        checks.append(("training step", lambda: _train_step(cfg, mode, chat_template)))
    rows = []
    for name, fn in checks:
        try:
            rows.append(Check(name, True, fn()))
        except Exception as e:  # every failure becomes a row; the messages never hold data values
            rows.append(Check(name, False, f"{type(e).__name__}: {e}"))
    return rows
