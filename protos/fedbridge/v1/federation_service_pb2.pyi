from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_KIND_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_KIND_DIFF: _ClassVar[PayloadKind]
    PAYLOAD_KIND_FULL: _ClassVar[PayloadKind]

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_WAIT: _ClassVar[TaskStatus]
    TASK_STATUS_TRAIN: _ClassVar[TaskStatus]
    TASK_STATUS_DONE: _ClassVar[TaskStatus]

class ArtifactKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_KIND_UNSPECIFIED: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_GLOBAL_ADAPTER: _ClassVar[ArtifactKind]
    ARTIFACT_KIND_BASE_RESIDUAL: _ClassVar[ArtifactKind]
PAYLOAD_KIND_UNSPECIFIED: PayloadKind
PAYLOAD_KIND_DIFF: PayloadKind
PAYLOAD_KIND_FULL: PayloadKind
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_WAIT: TaskStatus
TASK_STATUS_TRAIN: TaskStatus
TASK_STATUS_DONE: TaskStatus
ARTIFACT_KIND_UNSPECIFIED: ArtifactKind
ARTIFACT_KIND_GLOBAL_ADAPTER: ArtifactKind
ARTIFACT_KIND_BASE_RESIDUAL: ArtifactKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class AdapterSpec(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "tensors", "sha256", "compression")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    sha256: str
    compression: Compression
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., sha256: _Optional[str] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("encoding", "block_size", "topk_fraction")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    encoding: str
    block_size: int
    topk_fraction: float
    def __init__(self, encoding: _Optional[str] = ..., block_size: _Optional[int] = ..., topk_fraction: _Optional[float] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("mode", "max_steps", "learning_rate", "per_device_batch_size", "gradient_accumulation_steps", "max_length", "seed", "weight_decay", "warmup_ratio", "lr_scheduler_type", "beta", "loss_type", "rpo_alpha", "simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight", "label_smoothing", "weight_by")
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PER_DEVICE_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_TYPE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    RPO_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SIMPO_GAMMA_FIELD_NUMBER: _ClassVar[int]
    CPO_ALPHA_FIELD_NUMBER: _ClassVar[int]
    DESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNDESIRABLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BY_FIELD_NUMBER: _ClassVar[int]
    mode: str
    max_steps: int
    learning_rate: float
    per_device_batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    seed: int
    weight_decay: float
    warmup_ratio: float
    lr_scheduler_type: str
    beta: float
    loss_type: str
    rpo_alpha: float
    simpo_gamma: float
    cpo_alpha: float
    desirable_weight: float
    undesirable_weight: float
    label_smoothing: float
    weight_by: str
    def __init__(self, mode: _Optional[str] = ..., max_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., per_device_batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_length: _Optional[int] = ..., seed: _Optional[int] = ..., weight_decay: _Optional[float] = ..., warmup_ratio: _Optional[float] = ..., lr_scheduler_type: _Optional[str] = ..., beta: _Optional[float] = ..., loss_type: _Optional[str] = ..., rpo_alpha: _Optional[float] = ..., simpo_gamma: _Optional[float] = ..., cpo_alpha: _Optional[float] = ..., desirable_weight: _Optional[float] = ..., undesirable_weight: _Optional[float] = ..., label_smoothing: _Optional[float] = ..., weight_by: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("federation_id", "round", "total_rounds", "base_model_sha256", "base_model_ref", "training", "adapter_spec", "global_adapter_sha256", "global_adapter_size", "deadline_unix_ms", "hints", "base_residual_sha256", "base_residual_size", "dp", "chat_template", "chat_template_sha256", "global_adapter_compressed")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SPEC_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    BASE_RESIDUAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_RESIDUAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ADAPTER_COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    round: int
    total_rounds: int
    base_model_sha256: str
    base_model_ref: str
    training: TrainingConfig
    adapter_spec: AdapterSpec
    global_adapter_sha256: str
    global_adapter_size: int
    deadline_unix_ms: int
    hints: SiteHints
    base_residual_sha256: str
    base_residual_size: int
    dp: DpRequest
    chat_template: str
    chat_template_sha256: str
    global_adapter_compressed: bool
    def __init__(self, federation_id: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., base_model_sha256: _Optional[str] = ..., base_model_ref: _Optional[str] = ..., training: _Optional[_Union[TrainingConfig, _Mapping]] = ..., adapter_spec: _Optional[_Union[AdapterSpec, _Mapping]] = ..., global_adapter_sha256: _Optional[str] = ..., global_adapter_size: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., hints: _Optional[_Union[SiteHints, _Mapping]] = ..., base_residual_sha256: _Optional[str] = ..., base_residual_size: _Optional[int] = ..., dp: _Optional[_Union[DpRequest, _Mapping]] = ..., chat_template: _Optional[str] = ..., chat_template_sha256: _Optional[str] = ..., global_adapter_compressed: _Optional[bool] = ...) -> None: ...

class DpRequest(_message.Message):
    __slots__ = ("noise_multiplier", "clip_norm")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    clip_norm: float
    def __init__(self, noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ...) -> None: ...

class SiteHints(_message.Message):
    __slots__ = ("proximal_mu", "freeze_lora_a")
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    FREEZE_LORA_A_FIELD_NUMBER: _ClassVar[int]
    proximal_mu: float
    freeze_lora_a: bool
    def __init__(self, proximal_mu: _Optional[float] = ..., freeze_lora_a: _Optional[bool] = ...) -> None: ...

class UpdateEnvelope(_message.Message):
    __slots__ = ("federation_id", "round", "site", "base_model_sha256", "payload_sha256", "payload_size", "nonce", "payload_kind", "adapter_spec_sha256", "num_examples", "epsilon_spent", "created_unix_ms", "dp_delta")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SPEC_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    round: int
    site: str
    base_model_sha256: str
    payload_sha256: str
    payload_size: int
    nonce: bytes
    payload_kind: PayloadKind
    adapter_spec_sha256: str
    num_examples: int
    epsilon_spent: float
    created_unix_ms: int
    dp_delta: float
    def __init__(self, federation_id: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., payload_sha256: _Optional[str] = ..., payload_size: _Optional[int] = ..., nonce: _Optional[bytes] = ..., payload_kind: _Optional[_Union[PayloadKind, str]] = ..., adapter_spec_sha256: _Optional[str] = ..., num_examples: _Optional[int] = ..., epsilon_spent: _Optional[float] = ..., created_unix_ms: _Optional[int] = ..., dp_delta: _Optional[float] = ...) -> None: ...

class SignedEnvelope(_message.Message):
    __slots__ = ("envelope", "signature")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    signature: bytes
    def __init__(self, envelope: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("agent_version", "lora_rank", "modes")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    lora_rank: int
    modes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_version: _Optional[str] = ..., lora_rank: _Optional[int] = ..., modes: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("federation_id", "site", "poll_interval_ms")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site: str
    poll_interval_ms: int
    def __init__(self, federation_id: _Optional[str] = ..., site: _Optional[str] = ..., poll_interval_ms: _Optional[int] = ...) -> None: ...

class FetchTaskRequest(_message.Message):
    __slots__ = ("wait_ms",)
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    wait_ms: int
    def __init__(self, wait_ms: _Optional[int] = ...) -> None: ...

class FetchTaskResponse(_message.Message):
    __slots__ = ("status", "task")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    status: TaskStatus
    task: Task
    def __init__(self, status: _Optional[_Union[TaskStatus, str]] = ..., task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("round", "offset", "artifact")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    round: int
    offset: int
    artifact: ArtifactKind
    def __init__(self, round: _Optional[int] = ..., offset: _Optional[int] = ..., artifact: _Optional[_Union[ArtifactKind, str]] = ...) -> None: ...

class DownloadAdapterResponse(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("envelope", "offset", "data")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    envelope: SignedEnvelope
    offset: int
    data: bytes
    def __init__(self, envelope: _Optional[_Union[SignedEnvelope, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("accepted", "committed_offset", "update_id")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    committed_offset: int
    update_id: str
    def __init__(self, accepted: _Optional[bool] = ..., committed_offset: _Optional[int] = ..., update_id: _Optional[str] = ...) -> None: ...

class GetUploadStatusRequest(_message.Message):
    __slots__ = ("round", "payload_sha256")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    round: int
    payload_sha256: str
    def __init__(self, round: _Optional[int] = ..., payload_sha256: _Optional[str] = ...) -> None: ...

class GetUploadStatusResponse(_message.Message):
    __slots__ = ("committed_offset", "accepted")
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    committed_offset: int
    accepted: bool
    def __init__(self, committed_offset: _Optional[int] = ..., accepted: _Optional[bool] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("round", "phase", "metrics", "num_examples")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    metrics: _containers.ScalarMap[str, float]
    num_examples: int
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_examples: _Optional[int] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("round", "phase", "step", "total_steps")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    step: int
    total_steps: int
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("current_round", "round_open", "deadline_unix_ms", "interval_ms")
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_OPEN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    current_round: int
    round_open: bool
    deadline_unix_ms: int
    interval_ms: int
    def __init__(self, current_round: _Optional[int] = ..., round_open: _Optional[bool] = ..., deadline_unix_ms: _Optional[int] = ..., interval_ms: _Optional[int] = ...) -> None: ...

class ReportErrorRequest(_message.Message):
    __slots__ = ("round", "phase", "error_type", "message")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    error_type: str
    message: str
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., error_type: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReportErrorResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
