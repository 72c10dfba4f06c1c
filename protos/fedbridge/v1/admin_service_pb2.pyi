from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FederationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEDERATION_STATE_UNSPECIFIED: _ClassVar[FederationState]
    FEDERATION_STATE_NOT_STARTED: _ClassVar[FederationState]
    FEDERATION_STATE_RUNNING: _ClassVar[FederationState]
    FEDERATION_STATE_PAUSED: _ClassVar[FederationState]
    FEDERATION_STATE_STOPPED: _ClassVar[FederationState]
    FEDERATION_STATE_FINISHED: _ClassVar[FederationState]
FEDERATION_STATE_UNSPECIFIED: FederationState
FEDERATION_STATE_NOT_STARTED: FederationState
FEDERATION_STATE_RUNNING: FederationState
FEDERATION_STATE_PAUSED: FederationState
FEDERATION_STATE_STOPPED: FederationState
FEDERATION_STATE_FINISHED: FederationState

class SiteInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "agent_version", "lora_rank", "region", "joined_ms", "last_seen_ms", "status", "epsilon_spent", "updates", "problem")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    JOINED_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    agent_version: str
    lora_rank: int
    region: str
    joined_ms: int
    last_seen_ms: int
    status: str
    epsilon_spent: float
    updates: int
    problem: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., agent_version: _Optional[str] = ..., lora_rank: _Optional[int] = ..., region: _Optional[str] = ..., joined_ms: _Optional[int] = ..., last_seen_ms: _Optional[int] = ..., status: _Optional[str] = ..., epsilon_spent: _Optional[float] = ..., updates: _Optional[int] = ..., problem: _Optional[str] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSitesResponse(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation_id", "state", "current_round", "round_state", "total_rounds", "min_sites", "round_updates", "sites_joined", "sites_connected", "strategy", "latest_version", "site_problems")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_SITES_FIELD_NUMBER: _ClassVar[int]
    ROUND_UPDATES_FIELD_NUMBER: _ClassVar[int]
    SITES_JOINED_FIELD_NUMBER: _ClassVar[int]
    SITES_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    SITE_PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    state: FederationState
    current_round: int
    round_state: str
    total_rounds: int
    min_sites: int
    round_updates: int
    sites_joined: int
    sites_connected: int
    strategy: str
    latest_version: int
    site_problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, federation_id: _Optional[str] = ..., state: _Optional[_Union[FederationState, str]] = ..., current_round: _Optional[int] = ..., round_state: _Optional[str] = ..., total_rounds: _Optional[int] = ..., min_sites: _Optional[int] = ..., round_updates: _Optional[int] = ..., sites_joined: _Optional[int] = ..., sites_connected: _Optional[int] = ..., strategy: _Optional[str] = ..., latest_version: _Optional[int] = ..., site_problems: _Optional[_Iterable[str]] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "input_sha256", "output_sha256", "opened_ms", "closed_ms", "sites", "aggregation_error_mean", "aggregation_error_max", "train_loss")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OPENED_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_MS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_ERROR_MEAN_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_ERROR_MAX_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    input_sha256: str
    output_sha256: str
    opened_ms: int
    closed_ms: int
    sites: _containers.RepeatedScalarFieldContainer[str]
    aggregation_error_mean: float
    aggregation_error_max: float
    train_loss: float
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., input_sha256: _Optional[str] = ..., output_sha256: _Optional[str] = ..., opened_ms: _Optional[int] = ..., closed_ms: _Optional[int] = ..., sites: _Optional[_Iterable[str]] = ..., aggregation_error_mean: _Optional[float] = ..., aggregation_error_max: _Optional[float] = ..., train_loss: _Optional[float] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ...) -> None: ...

class EvaluationInfo(_message.Message):
    __slots__ = ("round", "status", "error", "seconds", "scores")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    round: int
    status: str
    error: str
    seconds: float
    scores: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., status: _Optional[str] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ..., scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListEvaluationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEvaluationsResponse(_message.Message):
    __slots__ = ("evaluations",)
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    evaluations: _containers.RepeatedCompositeFieldContainer[EvaluationInfo]
    def __init__(self, evaluations: _Optional[_Iterable[_Union[EvaluationInfo, _Mapping]]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: FederationState
    def __init__(self, state: _Optional[_Union[FederationState, str]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: FederationState
    def __init__(self, state: _Optional[_Union[FederationState, str]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: FederationState
    def __init__(self, state: _Optional[_Union[FederationState, str]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: FederationState
    def __init__(self, state: _Optional[_Union[FederationState, str]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("published", "round", "version", "path", "blocked_reason")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_REASON_FIELD_NUMBER: _ClassVar[int]
    published: bool
    round: int
    version: int
    path: str
    blocked_reason: str
    def __init__(self, published: _Optional[bool] = ..., round: _Optional[int] = ..., version: _Optional[int] = ..., path: _Optional[str] = ..., blocked_reason: _Optional[str] = ...) -> None: ...

class WithdrawSiteRequest(_message.Message):
    __slots__ = ("site", "reason")
    SITE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    site: str
    reason: str
    def __init__(self, site: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class WithdrawSiteResponse(_message.Message):
    __slots__ = ("rounds_done", "rounds_total", "done", "from_round", "version", "path", "global_sha256", "to_round", "published", "blocked_reason")
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TO_ROUND_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_REASON_FIELD_NUMBER: _ClassVar[int]
    rounds_done: int
    rounds_total: int
    done: bool
    from_round: int
    version: int
    path: str
    global_sha256: str
    to_round: int
    published: bool
    blocked_reason: str
    def __init__(self, rounds_done: _Optional[int] = ..., rounds_total: _Optional[int] = ..., done: _Optional[bool] = ..., from_round: _Optional[int] = ..., version: _Optional[int] = ..., path: _Optional[str] = ..., global_sha256: _Optional[str] = ..., to_round: _Optional[int] = ..., published: _Optional[bool] = ..., blocked_reason: _Optional[str] = ...) -> None: ...

class RevokeSiteRequest(_message.Message):
    __slots__ = ("site", "reason")
    SITE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    site: str
    reason: str
    def __init__(self, site: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeSiteResponse(_message.Message):
    __slots__ = ("site", "newly_revoked")
    SITE_FIELD_NUMBER: _ClassVar[int]
    NEWLY_REVOKED_FIELD_NUMBER: _ClassVar[int]
    site: str
    newly_revoked: bool
    def __init__(self, site: _Optional[str] = ..., newly_revoked: _Optional[bool] = ...) -> None: ...
