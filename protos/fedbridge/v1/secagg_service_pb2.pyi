from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STATUS_UNSPECIFIED: _ClassVar[SecAggStatus]
    SECAGG_STATUS_WAIT: _ClassVar[SecAggStatus]
    SECAGG_STATUS_READY: _ClassVar[SecAggStatus]
    SECAGG_STATUS_EXCLUDED: _ClassVar[SecAggStatus]

class SecretKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECRET_KIND_UNSPECIFIED: _ClassVar[SecretKind]
    SECRET_KIND_SELF_MASK_SEED: _ClassVar[SecretKind]
    SECRET_KIND_MASK_KEY: _ClassVar[SecretKind]
SECAGG_STATUS_UNSPECIFIED: SecAggStatus
SECAGG_STATUS_WAIT: SecAggStatus
SECAGG_STATUS_READY: SecAggStatus
SECAGG_STATUS_EXCLUDED: SecAggStatus
SECRET_KIND_UNSPECIFIED: SecretKind
SECRET_KIND_SELF_MASK_SEED: SecretKind
SECRET_KIND_MASK_KEY: SecretKind

class SecAggKeys(_message.Message):
    __slots__ = ("federation_id", "round", "site", "cipher_public_key", "mask_public_key", "attempt")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    round: int
    site: str
    cipher_public_key: bytes
    mask_public_key: bytes
    attempt: int
    def __init__(self, federation_id: _Optional[str] = ..., round: _Optional[int] = ..., site: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class SignedSecAggKeys(_message.Message):
    __slots__ = ("keys", "signature")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    keys: bytes
    signature: bytes
    def __init__(self, keys: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("threshold", "clip_range", "bits", "vector_length")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    threshold: int
    clip_range: float
    bits: int
    vector_length: int
    def __init__(self, threshold: _Optional[int] = ..., clip_range: _Optional[float] = ..., bits: _Optional[int] = ..., vector_length: _Optional[int] = ...) -> None: ...

class GetSettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSettingsResponse(_message.Message):
    __slots__ = ("enabled", "params")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    params: SecAggParams
    def __init__(self, enabled: _Optional[bool] = ..., params: _Optional[_Union[SecAggParams, _Mapping]] = ...) -> None: ...

class RosterEntry(_message.Message):
    __slots__ = ("site", "certificate_pem", "keys")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    site: str
    certificate_pem: bytes
    keys: SignedSecAggKeys
    def __init__(self, site: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., keys: _Optional[_Union[SignedSecAggKeys, _Mapping]] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("round", "keys")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    round: int
    keys: SignedSecAggKeys
    def __init__(self, round: _Optional[int] = ..., keys: _Optional[_Union[SignedSecAggKeys, _Mapping]] = ...) -> None: ...

class AdvertiseKeysResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRosterRequest(_message.Message):
    __slots__ = ("round", "wait_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    wait_ms: int
    def __init__(self, round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetRosterResponse(_message.Message):
    __slots__ = ("status", "entries", "params", "attempt")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    status: SecAggStatus
    entries: _containers.RepeatedCompositeFieldContainer[RosterEntry]
    params: SecAggParams
    attempt: int
    def __init__(self, status: _Optional[_Union[SecAggStatus, str]] = ..., entries: _Optional[_Iterable[_Union[RosterEntry, _Mapping]]] = ..., params: _Optional[_Union[SecAggParams, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("site", "ciphertext")
    SITE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    site: str
    ciphertext: bytes
    def __init__(self, site: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("round", "shares")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ShareKeysResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSharesRequest(_message.Message):
    __slots__ = ("round", "wait_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    wait_ms: int
    def __init__(self, round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetSharesResponse(_message.Message):
    __slots__ = ("status", "shares", "attempt")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    status: SecAggStatus
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    attempt: int
    def __init__(self, status: _Optional[_Union[SecAggStatus, str]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., attempt: _Optional[int] = ...) -> None: ...

class GetUnmaskRequestRequest(_message.Message):
    __slots__ = ("round", "wait_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    wait_ms: int
    def __init__(self, round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetUnmaskRequestResponse(_message.Message):
    __slots__ = ("status", "survivors", "dropped", "attempt")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    status: SecAggStatus
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    def __init__(self, status: _Optional[_Union[SecAggStatus, str]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("site", "kind", "share")
    SITE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    site: str
    kind: SecretKind
    share: bytes
    def __init__(self, site: _Optional[str] = ..., kind: _Optional[_Union[SecretKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskSharesRequest(_message.Message):
    __slots__ = ("round", "shares", "undecryptable")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    UNDECRYPTABLE_FIELD_NUMBER: _ClassVar[int]
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    undecryptable: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., undecryptable: _Optional[_Iterable[str]] = ...) -> None: ...

class UnmaskSharesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignSurvivorsRequest(_message.Message):
    __slots__ = ("round", "attempt", "signature")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    signature: bytes
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SignSurvivorsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SurvivorSignature(_message.Message):
    __slots__ = ("site", "signature")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    site: str
    signature: bytes
    def __init__(self, site: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class GetSurvivorSignaturesRequest(_message.Message):
    __slots__ = ("round", "wait_ms")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    round: int
    wait_ms: int
    def __init__(self, round: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetSurvivorSignaturesResponse(_message.Message):
    __slots__ = ("status", "attempt", "survivors", "signatures")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    status: SecAggStatus
    attempt: int
    survivors: _containers.RepeatedScalarFieldContainer[str]
    signatures: _containers.RepeatedCompositeFieldContainer[SurvivorSignature]
    def __init__(self, status: _Optional[_Union[SecAggStatus, str]] = ..., attempt: _Optional[int] = ..., survivors: _Optional[_Iterable[str]] = ..., signatures: _Optional[_Iterable[_Union[SurvivorSignature, _Mapping]]] = ...) -> None: ...
