"""The federation config (``federation.toml``): what the coordinator runs and what it asks sites to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos.tomlconfig import load_config

MODES = ("sft",)
SCHEDULERS = ("constant", "linear", "cosine")
# Rules whose output the round engine cannot publish yet: a dense base residual (FedEx-LoRA), a rank that changes per
# round (FLoRA) or a base residual from re-projection (FlexLoRA) are not yet carried into the published model.
ENGINE_UNSUPPORTED = {
    "fedex_lora": "its base-weight residual is not yet folded into the published model",
    "flora": "its folded stack (a base-weight residual) is not yet carried into the published model",
    "flexlora": "its SVD re-projection residual is not yet folded into the published model",
}


def check_strategy(name: str, params: dict[str, Any]) -> None:
    """Refuse, at start, an unknown strategy, a bad parameter, or a rule the round engine cannot run."""
    from strategies.registry import build_strategy
    from strategies.types import AggregationError

    try:
        strategy = build_strategy(name, params)
    except AggregationError as e:
        raise ValueError(f"field 'strategy': {e}") from None
    if strategy.name in ENGINE_UNSUPPORTED:
        raise ValueError(f"field 'strategy': {strategy.name!r} is implemented in strategies/ but the coordinator "
                         f"cannot run it yet: {ENGINE_UNSUPPORTED[strategy.name]}")


@dataclass(frozen=True)
class LoraSpec:
    """The adapter every site trains.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling is alpha / r).
        dropout: LoRA dropout during local training.
        target_modules: Module names to adapt, or ``["all-linear"]``.
        seed: Seed of the initial adapter (A is drawn from it; B starts at zero).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise ValueError(f"field 'lora.rank': must be in 1..1024, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"field 'lora.alpha': must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"field 'lora.dropout': must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("field 'lora.target_modules': must name at least one module")


@dataclass(frozen=True)
class TrainingSpec:
    """Local training each site runs per round (bounded by the site's own policy).

    Attributes:
        mode: Training mode; the skeleton supports ``sft``.
        max_steps: Optimizer steps per round.
        learning_rate: Peak learning rate.
        batch_size: Per-device batch size.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        max_length: Token limit per example.
        seed: Base seed; each round trains with ``seed + round``.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of steps of linear warm-up.
        lr_scheduler_type: Learning-rate schedule within a round's local steps: constant, linear or cosine.
    """

    mode: str = "sft"
    max_steps: int = 20
    learning_rate: float = 2e-3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "constant"

    def __post_init__(self) -> None:
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"field 'training.lr_scheduler_type': {self.lr_scheduler_type!r} is not one of {SCHEDULERS}")
        if self.mode not in MODES:
            raise ValueError(f"field 'training.mode': {self.mode!r} is not one of {MODES}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"field 'training.{name}': must be > 0, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"field 'training.learning_rate': must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"field 'training.warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True)
class TlsSpec:
    """Server-side mTLS material.

    Attributes:
        ca: The federation CA certificate (clients must chain to it).
        cert: The coordinator's server certificate.
        key: The coordinator's private key.
    """

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class FederationConfig:
    """Everything the coordinator needs to run a federation.

    Attributes:
        federation_id: Stable name of the federation (goes into every task and envelope).
        base_model: Local directory of the base model (HF format with a fedbridge manifest).
        base_model_ref: Where the base model comes from (hub id or a name), for provenance.
        rounds: Number of rounds.
        min_sites: Quorum: accepted updates needed to close a round.
        strategy: Aggregation strategy name (``strategies.registry.list_strategies()``).
        strategy_params: Parameters of the strategy (plus ``clip_norm`` for norm-bound clipping before the rule).
        lora: The adapter sites train.
        training: Local training per round.
        listen: ``host:port`` to serve on (port 0 picks a free port, written to ``state_dir/coordinator.port``).
        state_dir: Durable state: SQLite database, artifacts, partial uploads.
        registry_dir: Where published models go (one versioned directory each).
        tls: mTLS material.
        max_update_bytes: Refuse uploads larger than this.
        long_poll_ms: Longest time a FetchTask call is held when no task is ready.
        exit_when_done: Stop serving once the federation finished and the sites were told.
        record_inbound: If set, append every inbound request message's raw bytes to this file (a privacy audit tap).
    """

    federation_id: str
    base_model: Path
    tls: TlsSpec
    state_dir: Path
    registry_dir: Path
    base_model_ref: str = ""
    rounds: int = 3
    min_sites: int = 2
    strategy: str = "fedavg"
    strategy_params: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec = field(default_factory=LoraSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    listen: str = "127.0.0.1:0"
    max_update_bytes: int = 256 << 20
    long_poll_ms: int = 20_000
    exit_when_done: bool = False
    record_inbound: Path | None = None

    def __post_init__(self) -> None:
        if not self.federation_id or len(self.federation_id) > 128:
            raise ValueError("field 'federation_id': must be 1-128 characters")
        if self.rounds <= 0:
            raise ValueError(f"field 'rounds': must be > 0, got {self.rounds}")
        if self.min_sites <= 0:
            raise ValueError(f"field 'min_sites': must be > 0, got {self.min_sites}")
        check_strategy(self.strategy, self.strategy_params)
        if ":" not in self.listen:
            raise ValueError(f"field 'listen': must be host:port, got {self.listen!r}")


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and check ``federation.toml``; raises :class:`protos.tomlconfig.ConfigError` naming file and field."""
    return load_config(FederationConfig, path)
