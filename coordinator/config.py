"""The federation config (``federation.toml``): what the coordinator runs and what it asks sites to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommon.tomlconfig import load_config

MODES = ("sft", "qlora", "dpo", "kto", "orpo", "simpo")
# Loss variants per preference mode (TRL 1.16 names; ms-swift passes the same strings). "" is the trainer's default.
LOSS_TYPES = {
    "dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
            "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"),
    "kto": ("kto", "apo_zero_unpaired"),
    "simpo": ("simpo",),
}
SCHEDULERS = ("constant", "linear", "cosine")
WEIGHT_BY = ("examples", "tokens")
# FLoRA's stacked adapter grows in rank each round unless it is folded into the base; sites train one fixed spec,
# so the engine runs FLoRA only in the paper's fold-every-round form (max_rank = 0).
def _engine_limits(strategy: Any) -> str:
    if strategy.name == "flora" and strategy.config.max_rank > 0:
        return "flora with max_rank > 0 publishes a growing-rank adapter, which sites cannot follow; use max_rank = 0"
    return ""


def check_strategy(name: str, params: dict[str, Any]) -> None:
    """Refuse, at start, an unknown strategy, a bad parameter, or a rule the round engine cannot run."""
    from strategies.registry import build_strategy
    from strategies.types import AggregationError

    try:
        strategy = build_strategy(name, params)
    except AggregationError as e:
        raise ValueError(f"field 'strategy': {e}") from None
    limit = _engine_limits(strategy)
    if limit:
        raise ValueError(f"field 'strategy': {limit}")


WIRE_DTYPES = ("float32", "bfloat16")  # the adapter's dtype on the wire and in the store ([lora] wire_dtype)
COMPRESSIONS = ("none", "int8", "int4", "nf4")  # [lora] compression (protos.codec.ENCODINGS, or dense)


@dataclass(frozen=True)
class ModelSpec:
    """How the federation uses its base model (``[model]``).

    Attributes:
        chat_template: A Jinja chat template file (relative to federation.toml) for a base that ships none, or to
            train with instead of the base's own. Unset: the base tokenizer's own template. Either way the template
            in force is probed at start (the assistant-token mask must come from it) and pinned by SHA-256 in every
            task; a supplied file travels to the sites with the task.
    """

    chat_template: Path | None = None


@dataclass(frozen=True)
class LoraSpec:
    """The adapter every site trains.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling is alpha / r).
        dropout: LoRA dropout during local training.
        target_modules: Module names to adapt (suffixes such as ``q_proj``, matched as PEFT does), or
            ``["all-linear"]`` (the default: every linear layer but the output layer, which fits any architecture).
            Resolved against the base model's config at ``fedbridge-admin init`` and at coordinator start; a name
            that matches nothing is refused with the list of module names the base has.
        seed: Seed of the initial adapter (A is drawn from it; B starts at zero).
        wire_dtype: The dtype the adapter crosses the wire in, both ways, and is stored in: ``float32`` or
            ``bfloat16`` (half the bytes). Sites train float32 LoRA weights either way and cast their delta at
            egress, after clipping and noise; the coordinator aggregates in float32 sums and rounds the new global
            adapter to this dtype, so with ``bfloat16`` the global adapter is rounded once per round.
        compression: How site updates are encoded on the wire: ``none`` (dense, ``wire_dtype``), or blockwise
            absmax quantisation ``int8`` (about 0.26x the float32 bytes), ``int4`` or ``nf4`` (about 0.13x). Sites
            keep what the quantiser leaves out (error feedback) and add it to their next round's delta, so the
            error does not accumulate. Sent with every task (in the adapter spec), so all sites use the same one;
            the coordinator decodes each update at ingress and aggregates dense values. Not with secure
            aggregation.
        compression_block_size: Values per absmax block (even, 2..65536); each block costs one float32 scale.
        topk_fraction: With a compression: each tensor sends only its ``ceil(topk_fraction * n)`` largest-magnitude
            elements (with their indices, 4 bytes each), the rest goes into the error feedback. 0: dense.
        compress_download: Also send the global adapter to the sites encoded with ``compression``'s quantiser
            (never top-k). The coordinator's stored global adapter stays full precision.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    seed: int = 0
    wire_dtype: str = "float32"
    compression: str = "none"
    compression_block_size: int = 128
    topk_fraction: float = 0.0
    compress_download: bool = False

    def __post_init__(self) -> None:
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"field 'lora.wire_dtype': {self.wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"field 'lora.compression': {self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if not (2 <= self.compression_block_size <= 1 << 16 and self.compression_block_size % 2 == 0):
            raise ValueError(f"field 'lora.compression_block_size': must be even and in 2..65536, got "
                             f"{self.compression_block_size}")
        if not 0 <= self.topk_fraction < 1:
            raise ValueError(f"field 'lora.topk_fraction': must be in [0, 1), got {self.topk_fraction}")
        if self.compression == "none" and (self.topk_fraction or self.compress_download):
            which = "lora.topk_fraction" if self.topk_fraction else "lora.compress_download"
            raise ValueError(f"field '{which}': needs a quantiser; set lora.compression to int8, int4 or nf4")
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
        weight_by: What a site's FedAvg weight (its reported ``num_examples``) counts: ``examples``, the training
            examples it holds, or ``tokens``, the tokens of those examples the loss is computed on (SFT: assistant
            tokens; preference modes: prompt and answers, as the trainer tokenises them).
        seed: Base seed; each round trains with ``seed + round``.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of steps of linear warm-up.
        lr_scheduler_type: Learning-rate schedule within a round's local steps: constant, linear or cosine.
        beta: Preference modes: temperature of the implicit reward (ORPO: the weight lambda of the odds-ratio
            term). 0: TRL's default.
        loss_type: Loss variant: DPO (``sigmoid``, ``ipo``, ``hinge``, …), KTO (``kto``, ``apo_zero_unpaired``),
            SimPO (``simpo``). Empty: the mode's default. SFT, QLoRA and ORPO take none.
        rpo_alpha: DPO only: weight of the NLL term on chosen answers (RPO). 0: off.
        simpo_gamma: SimPO only: target reward margin gamma. 0: TRL's default (0.5).
        cpo_alpha: SimPO only: weight of the behaviour-cloning NLL term (0: pure SimPO).
        desirable_weight: KTO only: weight of desirable examples. 0: TRL's default (1.0).
        undesirable_weight: KTO only: weight of undesirable examples. 0: TRL's default (1.0).
        label_smoothing: DPO/SimPO: conservative label smoothing in [0, 0.5).
    """

    mode: str = "sft"
    max_steps: int = 20
    learning_rate: float = 2e-3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    weight_by: str = "examples"
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "constant"
    beta: float = 0.0
    loss_type: str = ""
    rpo_alpha: float = 0.0
    simpo_gamma: float = 0.0
    cpo_alpha: float = 0.0
    desirable_weight: float = 0.0
    undesirable_weight: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        self._check_preference()
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"field 'training.lr_scheduler_type': {self.lr_scheduler_type!r} is not one of {SCHEDULERS}")
        if self.weight_by not in WEIGHT_BY:
            raise ValueError(f"field 'training.weight_by': {self.weight_by!r} is not one of {WEIGHT_BY}")
        if self.mode not in MODES:
            raise ValueError(f"field 'training.mode': {self.mode!r} is not one of {MODES}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"field 'training.{name}': must be > 0, got {getattr(self, name)}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"field 'training.learning_rate': must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"field 'training.warmup_ratio': must be in [0, 1), got {self.warmup_ratio}")

    def _check_preference(self) -> None:
        """Each preference field is valid and used only by the modes that read it (a silently ignored knob is a bug)."""
        used_by = {"beta": ("dpo", "kto", "orpo", "simpo"), "rpo_alpha": ("dpo",), "simpo_gamma": ("simpo",),
                   "cpo_alpha": ("simpo",), "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
                   "label_smoothing": ("dpo", "simpo")}
        for name, modes in used_by.items():
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"field 'training.{name}': must be >= 0, got {value}")
            if value and self.mode not in modes:
                raise ValueError(f"field 'training.{name}': applies to mode {' or '.join(modes)}, not {self.mode!r}")
        if not self.label_smoothing < 0.5:
            raise ValueError(f"field 'training.label_smoothing': must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type and self.loss_type not in LOSS_TYPES.get(self.mode, ()):
            allowed = LOSS_TYPES.get(self.mode)
            raise ValueError(f"field 'training.loss_type': {self.loss_type!r} is not a loss of mode {self.mode!r}"
                             + (f" (one of {allowed})" if allowed else " (it takes none)"))


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


LOCAL_BENCHMARKS = ("general_mcq", "general_qa")  # EvalScope custom-dataset formats that run offline from local_path
QA_METRICS = ("Rouge", "BLEU")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One EvalScope benchmark that every evaluated merged model runs.

    Attributes:
        name: EvalScope benchmark: ``general_mcq`` / ``general_qa`` (local custom datasets, run offline) or a named
            one (mmlu, ceval, cmmlu, gsm8k, arc, ...) whose dataset the coordinator must reach, or find at local_path.
        local_path: Folder of the dataset files (required for general_mcq and general_qa).
        subsets: Subsets to run (file stems of a local dataset); empty means the benchmark's default.
        prompt_template: Prompt template; empty means an English default for general_mcq/general_qa (EvalScope's
            own defaults are Chinese) and EvalScope's template for named benchmarks.
        metrics: EvalScope metrics (general_qa: Rouge and/or BLEU); empty means Rouge for general_qa.
        strict_choice_parsing: general_mcq only: credit a reply only if it says ``ANSWER: <letter>``. EvalScope
            otherwise falls back to the last capital letter anywhere in the reply, which credits chance letters.
    """

    name: str
    local_path: Path | None = None
    subsets: tuple[str, ...] = ()
    prompt_template: str = ""
    metrics: tuple[str, ...] = ()
    strict_choice_parsing: bool = True

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"field 'evaluation.benchmarks.name': {self.name!r} is not a benchmark name")
        if self.name in LOCAL_BENCHMARKS and self.local_path is None:
            raise ValueError(f"field 'evaluation.benchmarks.local_path': benchmark {self.name!r} is a local custom "
                             "dataset and needs the folder of its jsonl files")
        bad = [m for m in self.metrics if m not in QA_METRICS]
        if self.name == "general_qa" and bad:
            raise ValueError(f"field 'evaluation.benchmarks.metrics': {bad[0]!r} is not one of {QA_METRICS}")


EVAL_MODES = ("local", "endpoint")


@dataclass(frozen=True)
class EvalSpec:
    """Shared evaluation of the merged model with EvalScope after aggregation.

    Attributes:
        enabled: Run the evaluation at all.
        every_k_rounds: Evaluate the global model after every k-th round; the last round is always evaluated.
        benchmarks: The shared benchmark list (names must be unique).
        max_new_tokens: Generation limit per answer.
        limit: At most this many samples per subset of every benchmark (0: all).
        dataset_hub: Where EvalScope fetches named benchmarks: ``modelscope`` or ``huggingface``.
        device_map: Where the merged model runs during evaluation (``cpu``, ``auto``, ``cuda:0``...).
        precision: Weight dtype during evaluation: ``float32``, ``bfloat16`` or ``float16``.
        punkt_dir: NLTK data folder for BLEU's ``punkt_tab``. If set and it lacks one, a Punkt model is trained on
            the local QA datasets' text and saved there (offline). Unset: BLEU needs ``punkt_tab`` on NLTK's
            search path, else the coordinator refuses to start (offline, EvalScope would silently score BLEU 0).
        mode: ``local``: EvalScope loads the merged model itself (``llm_ckpt``, on ``device_map``). ``endpoint``:
            EvalScope scores an OpenAI-compatible server (vLLM, TGI, SGLang...) that serves the merged model.
            The coordinator writes each merged candidate, starts ``serve_command`` on it, waits until
            ``api_url``'s ``/models`` lists ``model_id``, scores it, then stops the server.
        api_url: Endpoint mode: the server's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: Endpoint mode: the name of the environment variable holding the API key (the key itself
            never goes in the file). Empty: no key (``EMPTY`` is sent, as vLLM expects without ``--api-key``).
        model_id: Endpoint mode: the model name the server serves the merged model under.
        serve_command: Endpoint mode: the command that serves a merged model directory at ``api_url``, as an
            argument list; ``{model_dir}`` is replaced by the merged directory (e.g. ``["vllm", "serve",
            "{model_dir}", "--served-model-name", "merged", "--port", "8000"]``).
        ready_timeout_s: Endpoint mode: how long the server may take to list ``model_id``.
    """

    enabled: bool = False
    every_k_rounds: int = 1
    benchmarks: tuple[BenchmarkSpec, ...] = ()
    max_new_tokens: int = 32
    limit: int = 0
    dataset_hub: str = "modelscope"
    device_map: str = "cpu"
    precision: str = "float32"
    punkt_dir: Path | None = None
    mode: str = "local"
    api_url: str = ""
    api_key_env: str = ""
    model_id: str = ""
    serve_command: tuple[str, ...] = ()
    ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"field 'evaluation.mode': {self.mode!r} is not local or endpoint")
        if self.mode == "endpoint":
            if not self.api_url.startswith(("http://", "https://")):
                raise ValueError(f"field 'evaluation.api_url': endpoint mode needs an http(s) URL, got {self.api_url!r}")
            if not self.model_id:
                raise ValueError("field 'evaluation.model_id': endpoint mode needs the served model's name")
            if not any("{model_dir}" in a for a in self.serve_command):
                raise ValueError("field 'evaluation.serve_command': endpoint mode needs the command that serves the "
                                 "merged model, with '{model_dir}' where its directory goes (the merged model of "
                                 "each round exists only once the coordinator has written it)")
            if not self.ready_timeout_s > 0:
                raise ValueError(f"field 'evaluation.ready_timeout_s': must be > 0, got {self.ready_timeout_s}")
        if self.api_key_env and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError(f"field 'evaluation.api_key_env': {self.api_key_env!r} is not an environment variable "
                             "name (put the key in that variable, not in the file)")
        if self.every_k_rounds < 1:
            raise ValueError(f"field 'evaluation.every_k_rounds': must be >= 1, got {self.every_k_rounds}")
        if self.max_new_tokens < 1:
            raise ValueError(f"field 'evaluation.max_new_tokens': must be >= 1, got {self.max_new_tokens}")
        if self.limit < 0:
            raise ValueError(f"field 'evaluation.limit': must be >= 0, got {self.limit}")
        if self.dataset_hub not in ("modelscope", "huggingface"):
            raise ValueError(f"field 'evaluation.dataset_hub': {self.dataset_hub!r} is not modelscope or huggingface")
        if self.precision not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"field 'evaluation.precision': {self.precision!r} is not float32, bfloat16 or float16")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"field 'evaluation.benchmarks': names must be unique, got {names}")
        if self.enabled and not self.benchmarks:
            raise ValueError("field 'evaluation.benchmarks': evaluation is enabled but lists no benchmark")


@dataclass(frozen=True)
class GateSpec:
    """Release gate: what a merged model must score before it is published.

    Attributes:
        thresholds: Minimum primary score per gated benchmark (benchmark name -> score in [0, 1]). Only these
            benchmarks are gated; an empty table publishes without a gate.
        max_regression: Largest drop of a gated score allowed against the last published version (absolute).
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    max_regression: float = 0.0

    def __post_init__(self) -> None:
        for k, v in self.thresholds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"field 'gate.thresholds.{k}': must be a number in [0, 1], got {v!r}")
        if not 0 <= self.max_regression <= 1:
            raise ValueError(f"field 'gate.max_regression': must be in [0, 1], got {self.max_regression}")


@dataclass(frozen=True)
class PublishSpec:
    """What goes on the published model card besides provenance, and how the merged model is sharded.

    Attributes:
        license: Licence id for the card metadata (SPDX-like, e.g. ``apache-2.0``; ``other`` with a name and link).
        license_name: Licence name when ``license`` is ``other``.
        license_link: Link to the licence text.
        site_regions: Region per site name (e.g. ``site-a = "EU/DE"``); sites not listed show ``unspecified``.
        max_shard_mb: Largest safetensors shard of the merged model, in MiB.
    """

    license: str = "other"
    license_name: str = "unspecified"
    license_link: str = ""
    site_regions: dict[str, str] = field(default_factory=dict)
    max_shard_mb: int = 2048

    def __post_init__(self) -> None:
        if not self.license:
            raise ValueError("field 'publish.license': must not be empty")
        if self.max_shard_mb < 1:
            raise ValueError(f"field 'publish.max_shard_mb': must be >= 1, got {self.max_shard_mb}")
        for k, v in self.site_regions.items():
            if not isinstance(v, str):
                raise ValueError(f"field 'publish.site_regions.{k}': must be a string")


@dataclass(frozen=True)
class DashboardSpec:
    """The coordinator's web dashboard and Prometheus ``/metrics`` (one HTTP server in the coordinator process).

    Attributes:
        enabled: Serve the dashboard at all.
        listen: ``host:port`` (port 0 picks a free port, written to ``state_dir/dashboard.port``). Loopback by
            default; any other address needs ``token_env`` or ``require_admin_cert``.
        token_env: Name of the environment variable holding a bearer token the dashboard then requires
            (``Authorization: Bearer <token>`` or ``?token=<token>``). The token itself never goes in a file.
        require_admin_cert: Serve HTTPS with client certificates: only a certificate of the federation CA whose role
            is ``admin`` gets a page (uses the coordinator's TLS key, certificate and CA).
    """

    enabled: bool = True
    listen: str = "127.0.0.1:0"
    token_env: str = ""
    require_admin_cert: bool = False

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"field 'dashboard.listen': must be host:port, got {self.listen!r}")
        if self.enabled and not is_loopback(host) and not (self.token_env or self.require_admin_cert):
            raise ValueError(f"field 'dashboard.listen': {host!r} is not a loopback address; set dashboard.token_env "
                             "or dashboard.require_admin_cert so the dashboard is not open to the network")


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (``127.0.0.0/8``, ``::1``)."""
    import ipaddress

    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


LATE_POLICIES = ("drop", "next_round")


@dataclass(frozen=True)
class QuorumSpec:
    """When a round closes without waiting for everyone (``[quorum]``); the quorum k itself is ``min_sites``.

    A round closes as soon as ``min_sites`` (k) accepted updates are in. With a deadline it also closes
    ``deadline_s`` after it (or its current attempt) opened if at least ``min_at_deadline`` updates are in; with
    fewer, that attempt is **abandoned and the round retried**: the round keeps its number and its input global
    adapter, every update already accepted for it stays counted (they were trained on that same input, so nothing
    accepted is lost or counted twice), a new attempt with a fresh deadline starts, and sites that have not sent an
    update yet are offered the round again. With heartbeats, a site silent for longer than ``heartbeat_timeout_s``
    counts as dropped for the round, and the round closes early once every site still alive has answered (and at
    least ``min_at_deadline`` updates are in).

    Attributes:
        deadline_s: Seconds after a round (attempt) opens at which it closes with what it has (0: no deadline; the
            round waits for k updates). Default 24 h: a backstop for a site that is alive but never finishes, far
            above any one round of real local training; size it to a few times the slowest site's round time.
        min_at_deadline: Fewest accepted updates a round may close with at its deadline or by heartbeat drops;
            below it the attempt is abandoned and retried (0: k, i.e. never close short).
        max_attempts: Give up (stop the coordinator loudly, state kept) after this many abandoned attempts of one
            round (0: retry forever).
        heartbeat_timeout_s: A site whose last call (heartbeat, poll, upload) is older than this counts as dropped
            for the open round and is shown ``silent`` (0: heartbeats are not used to drop sites). Default 300 s:
            an agent beats every third of it from a background thread for as long as it runs, so only a dead,
            frozen or cut-off site goes silent. A site that reports its own crash (ReportError) counts as dropped
            at once, whatever this is.
        late_policy: What happens to an update for a round that already closed: ``drop`` refuses it
            (FAILED_PRECONDITION) and records the refusal; ``next_round`` accepts it into the open round's aggregate
            with its FedAvg weight scaled by the staleness factor ``(1 + s) ** -staleness_exponent``, where ``s`` is
            the number of rounds between the round it was trained on and the round it joins (FedAsync's polynomial
            staleness function, Xie et al. 2019, arXiv:1903.03934).
        staleness_exponent: The ``a`` of the staleness factor (``>= 0``; 0 weighs late updates like fresh ones).
    """

    deadline_s: float = 86400.0
    min_at_deadline: int = 0
    max_attempts: int = 0
    heartbeat_timeout_s: float = 300.0
    late_policy: str = "drop"
    staleness_exponent: float = 0.5

    def __post_init__(self) -> None:
        for name in ("deadline_s", "heartbeat_timeout_s", "staleness_exponent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ValueError(f"field 'quorum.{name}': must be a finite number >= 0, got {v!r}")
        for name in ("min_at_deadline", "max_attempts"):
            if getattr(self, name) < 0:
                raise ValueError(f"field 'quorum.{name}': must be >= 0, got {getattr(self, name)}")
        if self.late_policy not in LATE_POLICIES:
            raise ValueError(f"field 'quorum.late_policy': {self.late_policy!r} is not one of {LATE_POLICIES}")

    def staleness_weight(self, staleness: int) -> float:
        """FedAsync's polynomial staleness factor ``(1 + s) ** -a`` for an update ``s`` rounds old."""
        return float((1 + staleness) ** -self.staleness_exponent)


def check_gate(evaluation: EvalSpec, gate: GateSpec) -> None:
    """Refuse a gate on benchmarks that are not evaluated."""
    if gate.thresholds and not evaluation.enabled:
        raise ValueError("field 'gate.thresholds': a release gate needs evaluation.enabled = true")
    unknown = sorted(set(gate.thresholds) - {b.name for b in evaluation.benchmarks})
    if unknown:
        raise ValueError(f"field 'gate.thresholds': {unknown[0]!r} is not one of evaluation.benchmarks")


# -- secure aggregation (issue #5 item 4) ------------------------------------------------------------------------------
# Rules that need individual updates (robust rules, FedEx-LoRA's residual, FLoRA's stacking, mixed-rank rules) or that
# clip each update at the coordinator cannot run on a sum. Mixed ranks give sites vectors of different lengths.
SECAGG_REFUSED = {"hetlora": "sites train different ranks, so their masked vectors cannot be summed"}


@dataclass(frozen=True)
class SecureAggregationSpec:
    """Secure aggregation (SecAgg/SecAgg+): the coordinator learns only the sum of a round's updates.

    Attributes:
        enabled: Run every round under secure aggregation.
        threshold: Shares needed to reconstruct a site's secret, and the fewest sites a round may finish with. The
            coordinator raises it to more than half of the round's roster, so it can never collect both secrets
            of one site from disjoint halves.
        clip_range: Largest |value| of a weighted update element (num_examples x delta, and num_examples itself);
            a site refuses to send a larger one rather than clip it.
        bits: Fixed-point bits: step = clip_range / 2^(bits-1); the mean is exact to num_sites * step / 2 / weight.
        stage_timeout_s: Every stage's deadline (roster, key sharing, masked input, consistency check,
            unmasking): past it with enough sites the missing ones are dropped; with fewer than the threshold the
            attempt is abandoned and retried without the missing sites.
        max_attempts: SecAgg attempts of one round before the coordinator stops it as failed (audited).
    """

    enabled: bool = False
    threshold: int = 2
    clip_range: float = 65536.0
    bits: int = 48
    stage_timeout_s: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise ValueError(f"field 'secure_aggregation.threshold': must be >= 2, got {self.threshold}")
        if not 0 < self.clip_range < 2**40:
            raise ValueError(f"field 'secure_aggregation.clip_range': must be in (0, 2^40), got {self.clip_range}")
        if not 8 <= self.bits <= 48:
            raise ValueError(f"field 'secure_aggregation.bits': must be in 8..48 (sums wrap at 2^64), got {self.bits}")
        if self.stage_timeout_s <= 0:
            raise ValueError(f"field 'secure_aggregation.stage_timeout_s': must be > 0, got {self.stage_timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"field 'secure_aggregation.max_attempts': must be >= 1, got {self.max_attempts}")

    def timeout_for(self, stage: str) -> float:
        """The deadline of ``stage``, in seconds after the previous stage closed (the same for every stage)."""
        return self.stage_timeout_s


def check_secure_aggregation(spec: SecureAggregationSpec, strategy: str, params: dict[str, Any],
                             min_sites: int, privacy_mode: str = "none", late_policy: str = "drop") -> None:
    """Refuse, at start, secure aggregation with a rule that needs each site's update on its own."""
    if not spec.enabled:
        return
    from strategies.registry import CLIP_PARAM, build_strategy

    rule = build_strategy(strategy, params)
    if not rule.linear or rule.name in SECAGG_REFUSED:
        why = SECAGG_REFUSED.get(rule.name, "it needs each site's update on its own, and secure aggregation "
                                 "reveals only their sum")
        raise ValueError(f"field 'strategy': {rule.name!r} cannot run with secure_aggregation.enabled: {why}. "
                         "Use a linear rule (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, ffa_lora, fed_sb)")
    if CLIP_PARAM in params:
        raise ValueError(f"field 'strategy_params.{CLIP_PARAM}': coordinator-side clipping needs each update; with "
                         "secure_aggregation.enabled clip at the sites (their egress filters) instead")
    if late_policy == "next_round":
        raise ValueError("field 'quorum.late_policy': 'next_round' carries a late update into the next round, but a "
                         "masked update only unmasks together with its own round's sites; use late_policy = 'drop' "
                         "with secure_aggregation.enabled")
    if privacy_mode == "central":
        raise ValueError("field 'privacy.mode': central DP clips each update at the coordinator, which secure "
                         "aggregation never sees; with secure_aggregation.enabled use privacy.mode = 'local' (sites "
                         "clip and noise before masking)")
    if min_sites < spec.threshold:
        raise ValueError(f"field 'min_sites': {min_sites} is below secure_aggregation.threshold {spec.threshold}")
PRIVACY_MODES = ("none", "local", "central")
# Central DP adds one noise draw to the uniform mean of the clipped updates, so the rule's output must be a function
# of that mean (then the noise is calibrated to the mean's sensitivity C/n and the rule is post-processing).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fed_sb")


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy of the federation (``[privacy]``): site-level DP of each site's whole update per round.

    Attributes:
        mode: ``none``; ``local``: every task asks sites to clip their update to ``clip_norm`` and add Gaussian noise
            of std ``noise_multiplier × clip_norm`` (each site accounts its own ε and may add more); ``central``: the
            coordinator clips each update to ``clip_norm``, averages them with uniform weights and adds noise of std
            ``noise_multiplier × clip_norm / n`` to the mean (DP-FedAvg with fixed clipping), and accounts ε itself.
        noise_multiplier: σ (> 0 unless mode is none).
        clip_norm: L2 bound C on each site's whole update (> 0 unless mode is none).
        delta: The δ at which the coordinator accounts and reports central ε.
    """

    mode: str = "none"
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in PRIVACY_MODES:
            raise ValueError(f"field 'privacy.mode': {self.mode!r} is not one of {PRIVACY_MODES}")
        for name in ("noise_multiplier", "clip_norm"):
            value = getattr(self, name)
            if self.mode != "none" and not (0 < value < float("inf")):
                raise ValueError(f"field 'privacy.{name}': mode {self.mode!r} needs a finite number > 0, got {value}")
        if not 0 < self.delta < 1:
            raise ValueError(f"field 'privacy.delta': must be in (0, 1), got {self.delta}")


def check_privacy(strategy: str, params: dict[str, Any], privacy: PrivacySpec) -> None:
    """Refuse central DP with a rule whose output is not a function of the mean of the updates."""
    from strategies.registry import build_strategy

    if privacy.mode != "central":
        return
    name = build_strategy(strategy, params).name
    if privacy.mode == "central" and name not in CENTRAL_DP_STRATEGIES:
        raise ValueError(
            f"field 'privacy.mode': central DP is calibrated to the mean of the clipped updates (sensitivity "
            f"clip_norm / n), but strategy {name!r} does not aggregate through that mean (robust rules select or "
            f"rank individual updates, LoRA-structural and mixed-rank rules multiply or project them), so no epsilon "
            f"could be stated. Use privacy.mode = 'local' (site-side noise holds under any rule), or "
            f"strategy_params.clip_norm alone (bounds each site's influence, gives no DP), or one of "
            f"{CENTRAL_DP_STRATEGIES}.")


@dataclass(frozen=True)
class RecordsSpec:
    """GDPR Art. 30 record of processing (``fedbridge-admin export-records``). Unset values are reported as unset,
    never filled with invented text.

    Attributes:
        controller: Who operates the coordinator (name and contact) and answers for the federation's processing.
        purposes: Purposes of the processing (e.g. "fine-tune a triage assistant").
        data_categories: Categories of personal data in the sites' private training data.
        data_subjects: Categories of data subjects (e.g. "patients", "customers").
        recipients: Who receives the published model.
        coordinator_region: Region of the coordinator's host (e.g. EU-DE): the destination of every transfer.
        retention_days: How long the coordinator keeps received updates and audit logs (0: unset).
    """

    controller: str = ""
    purposes: tuple[str, ...] = ()
    data_categories: tuple[str, ...] = ()
    data_subjects: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    coordinator_region: str = ""
    retention_days: int = 0

    def __post_init__(self) -> None:
        if self.retention_days < 0:
            raise ValueError(f"field 'records.retention_days': must be >= 0, got {self.retention_days}")


@dataclass(frozen=True)
class FederationConfig:
    """Everything the coordinator needs to run a federation.

    Attributes:
        federation_id: Stable name of the federation (goes into every task and envelope).
        base_model: Local directory of the base model (HF format with a fedbridge manifest).
        base_model_ref: Where the base model comes from (hub id or a name), for provenance.
        rounds: Number of rounds.
        min_sites: Quorum k: a round closes as soon as this many accepted updates are in (see ``quorum`` for
            deadlines, heartbeats, abandon/retry and late updates).
        strategy: Aggregation strategy name (``strategies.registry.list_strategies()``).
        strategy_params: Parameters of the strategy (plus ``clip_norm`` for norm-bound clipping before the rule).
        model: The chat template the federation trains with.
        lora: The adapter sites train.
        training: Local training per round.
        listen: ``host:port`` to serve on (port 0 picks a free port, written to ``state_dir/coordinator.port``).
        state_dir: Durable state: SQLite database, artifacts, partial uploads.
        registry_dir: Where published models go (one versioned directory each).
        tls: mTLS material.
        max_update_bytes: Refuse uploads larger than this.
        long_poll_ms: Longest time a FetchTask call is held when no task is ready.
        exit_when_done: Stop serving once the federation finished and every joined, unrevoked site fetched its DONE
            and sent its last report (at most ``server.DRAIN_TIMEOUT_S`` for a site that never comes back).
        record_inbound: If set, append every inbound request message's raw bytes to this file (a privacy audit tap).
        evaluation: Shared EvalScope evaluation of the merged model (off by default).
        gate: Release gate on the evaluation's scores.
        publish: Model-card licence fields, site regions, shard size.
        autostart: Start running rounds as soon as the coordinator starts; false waits for ``fedbridge-admin start``.
        dashboard: The web dashboard and ``/metrics``.
        secure_aggregation: Secure aggregation of each round's updates (off by default).
        enrolment_registry: ``enrolment.json`` of the federation directory: only the site certificates it lists
            (and has not revoked) may act as sites. Unset: any CA-signed site certificate.
        crl: CRL file signed by the federation CA (``fedbridge-admin revoke-site``); reloaded when it changes.
        max_update_norm: Refuse updates whose L2 norm over all tensors is above this (0: no bound).
        records: GDPR Art. 30 record-of-processing fields.
        privacy: Differential privacy: none, local (sites noise) or central (the coordinator noises the aggregate).
        quorum: Deadline, minimum at the deadline, heartbeats and the late-update policy of every round.
        max_partial_uploads_per_site: Unfinished (resumable) uploads kept per site; one more is refused with
            RESOURCE_EXHAUSTED. Partials of a round are removed when it closes.
        max_partial_bytes_per_site: Bytes of unfinished uploads kept per site (a stream counts at the size its
            envelope declares from its first message); must be at least ``max_update_bytes``.
        envelope_clock_skew_s: How far a signed envelope's ``created_unix_ms`` may lie in the future, or before its
            round opened, and still be accepted (clock skew between site and coordinator).
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
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    listen: str = "127.0.0.1:0"
    max_update_bytes: int = 256 << 20
    long_poll_ms: int = 20_000
    exit_when_done: bool = False
    record_inbound: Path | None = None
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    gate: GateSpec = field(default_factory=GateSpec)
    publish: PublishSpec = field(default_factory=PublishSpec)
    autostart: bool = True
    dashboard: DashboardSpec = field(default_factory=DashboardSpec)
    secure_aggregation: SecureAggregationSpec = field(default_factory=SecureAggregationSpec)
    # Security (issue #5): enrolment, revocation, ingress bound, record of processing.
    enrolment_registry: Path | None = None
    crl: Path | None = None
    max_update_norm: float = 0.0
    records: RecordsSpec = field(default_factory=RecordsSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    quorum: QuorumSpec = field(default_factory=QuorumSpec)
    # Ingress bounds (issue #13).
    max_partial_uploads_per_site: int = 4
    max_partial_bytes_per_site: int = 1 << 30
    # An hour of skew either way plus five minutes of margin: a site clock exactly an hour off (a time zone set
    # wrong, the commonest skew) must not pass or fail on how long the upload took.
    envelope_clock_skew_s: float = 3900.0

    def __post_init__(self) -> None:
        if not (self.max_update_norm >= 0 and self.max_update_norm != float("inf")):
            raise ValueError(f"field 'max_update_norm': must be a finite number >= 0, got {self.max_update_norm}")
        if not self.federation_id or len(self.federation_id) > 128:
            raise ValueError("field 'federation_id': must be 1-128 characters")
        if self.rounds <= 0:
            raise ValueError(f"field 'rounds': must be > 0, got {self.rounds}")
        if self.min_sites <= 0:
            raise ValueError(f"field 'min_sites': must be > 0, got {self.min_sites}")
        if self.quorum.min_at_deadline > self.min_sites:
            raise ValueError(f"field 'quorum.min_at_deadline': {self.quorum.min_at_deadline} is more than the quorum "
                             f"k (min_sites = {self.min_sites}); a round closes at k anyway")
        if self.quorum.min_at_deadline and not (self.quorum.deadline_s or self.quorum.heartbeat_timeout_s):
            raise ValueError("field 'quorum.min_at_deadline': applies only with quorum.deadline_s or "
                             "quorum.heartbeat_timeout_s set")
        check_strategy(self.strategy, self.strategy_params)
        check_gate(self.evaluation, self.gate)
        check_secure_aggregation(self.secure_aggregation, self.strategy, self.strategy_params, self.min_sites,
                                 self.privacy.mode, self.quorum.late_policy)
        check_privacy(self.strategy, self.strategy_params, self.privacy)
        if self.secure_aggregation.enabled and self.lora.compression != "none":
            raise ValueError("field 'lora.compression': cannot run with secure_aggregation.enabled: SecAgg masks "
                             "fixed-point values in a finite field, so a quantised update would have to use SecAgg's "
                             "own quantiser, which is not done; use lora.compression = 'none' with secure aggregation")
        if self.lora.compression != "none" and self.strategy.strip().lower().replace("-", "_") == "fed_sb":
            raise ValueError("field 'lora.compression': cannot run with strategy fed-sb: its update is already only the "
                             "small r x r matrices, and encoding them is not supported; use lora.compression = 'none'")
        if self.max_partial_uploads_per_site < 1:
            raise ValueError("field 'max_partial_uploads_per_site': must be >= 1, got "
                             f"{self.max_partial_uploads_per_site}")
        if self.max_partial_bytes_per_site < self.max_update_bytes:
            raise ValueError(f"field 'max_partial_bytes_per_site': {self.max_partial_bytes_per_site} is below "
                             f"max_update_bytes = {self.max_update_bytes}; the largest update could never upload")
        if not (0 < self.envelope_clock_skew_s < float("inf")):
            raise ValueError(f"field 'envelope_clock_skew_s': must be a finite number > 0, got "
                             f"{self.envelope_clock_skew_s}")
        if ":" not in self.listen:
            raise ValueError(f"field 'listen': must be host:port, got {self.listen!r}")

    @property
    def min_to_close(self) -> int:
        """Fewest updates a round may close with at its deadline or by heartbeat drops."""
        return self.quorum.min_at_deadline or self.min_sites


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and check ``federation.toml``; raises :class:`fedcommon.tomlconfig.ConfigError` naming file and field."""
    return load_config(FederationConfig, path)
