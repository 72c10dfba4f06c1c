"""The site's own config (``site.toml``): where its coordinator, keys, base model and private data are."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcommon.tomlconfig import ConfigError, load_config, load_toml
from site_agent.egress.dp import SiteDpConfig


@dataclass(frozen=True)
class SiteTls:
    """The site kit's key material.

    Attributes:
        ca: Federation CA certificate (the coordinator's certificate must chain to it).
        cert: This site's client certificate (its identity).
        key: This site's TLS private key.
        signing_key: This site's Ed25519 key for update envelopes (its public half is in the certificate).
    """

    ca: Path
    cert: Path
    key: Path
    signing_key: Path


@dataclass(frozen=True)
class SiteData:
    """Private data files; they never leave the site.

    Attributes:
        train: Training jsonl: chat ``messages``, ShareGPT or alpaca for sft/qlora; ``prompt``/``chosen``/
            ``rejected`` pairs for dpo/orpo/simpo; ``prompt``/``completion``/``label`` rows for kto.
        heldout: Held-out chat/ShareGPT/alpaca jsonl scored against each global adapter (only the metrics leave):
            loss, plus accuracy when every row is multiple-choice (see :mod:`site_agent.training.evaluation`).
    """

    train: Path
    heldout: Path | None = None


DEVICE_MAPS = ("", "auto", "balanced", "balanced_low_0", "sequential")  # transformers' placement strategies


@dataclass(frozen=True)
class SiteConfig:
    """Everything a site agent needs.

    Attributes:
        name: The site's name (must match the CN of its certificate).
        coordinator: ``host:port`` of the coordinator.
        base_model: Local directory of the base model; verified against the task's manifest hash.
        tls: Key material.
        data: Private data.
        work_dir: Scratch space for training.
        server_name: TLS name to expect on the coordinator's certificate when it differs from the host.
        threads: Torch CPU threads (0: torch's default).
        fetch_wait_ms: Long-poll time per FetchTask call.
        retry_for_s: How long to keep retrying when the coordinator is unreachable.
        lora_rank: LoRA rank this site trains, declared at Join (0: the federation's rank; a lower rank needs a
            mixed-rank strategy such as hetlora).
        policy: The site's ``policy.toml`` (see :mod:`site_agent.policy`). Unset: the permissive defaults, which
            still pin the base model by the task's manifest hash and trust only the kit's CA; the agent warns.
        upload_chunk_bytes: Bytes per message of an update upload (0: the protocol's default, 1 MiB). The
            coordinator keeps what arrived whole, so after a broken stream or a restart the upload resumes at the
            last whole chunk: a smaller chunk re-sends less on a flaky link.
        checkpoint_steps: Save a step checkpoint every this many local steps, so an agent killed mid-round resumes
            the round there on restart (0: off).
        deepspeed: A DeepSpeed JSON config (ZeRO stage 1, 2 or 3; mode sft) for training through accelerate/DeepSpeed
            on a multi-GPU site (launch the agent under ``torchrun``/``accelerate launch``); without a launcher it runs
            single-process. Unset: plain PyTorch.
        device_map: On CUDA, how the base is placed: ``"auto"`` (or ``balanced``, ``sequential``...) spreads a base
            larger than one GPU over the visible GPUs (transformers' ``device_map``); one process only, not with
            a multi-rank launch. Empty: the whole base on one GPU. Ignored on CPU.
        dp: The site's own differential-privacy settings (noise multiplier, clip bound, ledger file); combined with
            the task's request into the stronger one (see :mod:`site_agent.egress.dp`).
    """

    name: str
    coordinator: str
    base_model: Path
    tls: SiteTls
    data: SiteData
    work_dir: Path
    server_name: str = ""
    threads: int = 0
    fetch_wait_ms: int = 15_000
    retry_for_s: float = 300.0
    lora_rank: int = 0
    policy: Path | None = None
    checkpoint_steps: int = 0
    upload_chunk_bytes: int = 0
    deepspeed: Path | None = None
    dp: SiteDpConfig = field(default_factory=SiteDpConfig)
    device_map: str = ""

    def __post_init__(self) -> None:
        if self.device_map not in DEVICE_MAPS and not self.device_map.startswith("cuda"):
            raise ValueError(f"field 'device_map': {self.device_map!r} is not one of {', '.join(DEVICE_MAPS[1:])} "
                             "or a cuda device")
        if ":" not in self.coordinator:
            raise ValueError(f"field 'coordinator': must be host:port, got {self.coordinator!r}")
        if self.lora_rank < 0:
            raise ValueError(f"field 'lora_rank': must be >= 0, got {self.lora_rank}")
        if self.checkpoint_steps < 0:
            raise ValueError(f"field 'checkpoint_steps': must be >= 0, got {self.checkpoint_steps}")
        if not 0 <= self.upload_chunk_bytes <= 4 << 20:  # half the 8 MiB message limit both ends set
            raise ValueError(f"field 'upload_chunk_bytes': must be in 0..{4 << 20} (0: the default), got "
                             f"{self.upload_chunk_bytes}")
        if self.threads < 0:
            raise ValueError(f"field 'threads': must be >= 0, got {self.threads}")


def load_site_config(path: str | Path, ready: bool = False) -> SiteConfig:
    """Read and check ``site.toml`` (relative paths resolve against its folder).

    Args:
        path: The file.
        ready: Also refuse a file that still holds a ``<FILL IN: ...>`` placeholder (the kit's, written by
            ``install-bundle``): the agent must not start on one.
    """
    if ready:
        from fedcommon.configdoc import find_placeholders

        raw = load_toml(path)
        left = find_placeholders(raw)
        if left:
            more = f" (and {', '.join(left[1:])})" if left[1:] else ""
            raise ConfigError(f"{path}: field '{left[0]}': still holds its placeholder; fill it in{more}: "
                              f"{_lookup(raw, left[0])}")
    return load_config(SiteConfig, path)


def _lookup(raw: dict, dotted: str) -> object:
    value: object = raw
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "<FILL IN: ...>"
        value = value[part]
    return value
