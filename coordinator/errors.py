"""Domain errors of the coordinator. The servicer maps each to one gRPC status code.

How an update is refused (each refusal also gets an ``update_refused`` audit record, and never reaches the store):

=============================================  ======================  ======================
refusal                                        error                   gRPC status
=============================================  ======================  ======================
signature does not verify with the cert's key  BadSignature            UNAUTHENTICATED
nonce already used by an accepted update       ReplayedNonce           ALREADY_EXISTS
second, different update for the same round    DuplicateUpdate         ALREADY_EXISTS
old / future / closing round                   WrongRound              FAILED_PRECONDITION
payload size or SHA-256 differs from envelope  PayloadMismatch         DATA_LOSS
unknown / missing keys, shapes, dtypes, NaN,   InvalidUpdate           INVALID_ARGUMENT
Inf, malformed safetensors or envelope fields
L2 norm above ``max_update_norm``              NormTooLarge            OUT_OF_RANGE
payload above ``max_update_bytes`` (declared   UpdateTooLarge          RESOURCE_EXHAUSTED
or streamed past the declared size)
not a site cert, unenrolled, revoked           PermissionDenied        PERMISSION_DENIED
                                               NotEnrolled / Revoked
site certificate expired (on an open           CertificateExpired      UNAUTHENTICATED
connection)
envelope names another site than the cert      PermissionDenied        PERMISSION_DENIED
created_unix_ms outside the skew window        StaleEnvelope           FAILED_PRECONDITION
a uint64 field at or above 2**63 (or a round   OutOfRange              OUT_OF_RANGE
above 2**31-1)
too many / too large unfinished uploads        PartialQuotaExceeded    RESOURCE_EXHAUSTED
another stream writes the same partial now     UploadBusy              ABORTED
the coordinator's disk is full (any call that  StorageFull             RESOURCE_EXHAUSTED
stores something; retried after a pause)
=============================================  ======================  ======================
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class; ``status`` names the grpc.StatusCode the transport reports."""

    status = "INTERNAL"


class Unauthenticated(CoordinatorError):
    status = "UNAUTHENTICATED"


class PermissionDenied(CoordinatorError):
    status = "PERMISSION_DENIED"


class InvalidUpdate(CoordinatorError):
    status = "INVALID_ARGUMENT"


class WrongRound(CoordinatorError):
    status = "FAILED_PRECONDITION"


class DuplicateUpdate(CoordinatorError):
    status = "ALREADY_EXISTS"


class UpdateTooLarge(CoordinatorError):
    status = "RESOURCE_EXHAUSTED"


class NotFound(CoordinatorError):
    status = "NOT_FOUND"


# Precise refusals of an update (issue #5). Each subclasses the broader error it refines, so callers that catch the
# broad class still do; the servicer reports the precise status.
class BadSignature(InvalidUpdate):
    """The envelope's Ed25519 signature does not verify with the key the site's certificate binds."""

    status = "UNAUTHENTICATED"


class ReplayedNonce(InvalidUpdate):
    """The envelope's nonce was already used by an accepted update."""

    status = "ALREADY_EXISTS"


class PayloadMismatch(InvalidUpdate):
    """The bytes received do not match the size or SHA-256 the signed envelope declares."""

    status = "DATA_LOSS"


class NormTooLarge(InvalidUpdate):
    """The update's L2 norm is above the federation's ``max_update_norm``."""

    status = "OUT_OF_RANGE"


class OutOfRange(InvalidUpdate):
    """A request field is outside the range the coordinator can hold (e.g. a uint64 at or above 2**63)."""

    status = "OUT_OF_RANGE"


class StaleEnvelope(InvalidUpdate):
    """The signed ``created_unix_ms`` is outside the allowed window (before the round opened, or in the future,
    beyond ``envelope_clock_skew_s``)."""

    status = "FAILED_PRECONDITION"


class PartialQuotaExceeded(CoordinatorError):
    """The site holds as many unfinished uploads (count or bytes) as the coordinator keeps for one site."""

    status = "RESOURCE_EXHAUSTED"


class UploadBusy(CoordinatorError):
    """Another stream is writing the same partial upload now (or it was removed mid-stream): retry."""

    status = "ABORTED"


class StorageFull(CoordinatorError):
    """The coordinator's disk (or quota) is full: the call stored nothing it would report, and may be retried
    unchanged once space returns. The refusal carries the pause to retry after (``protos.codec.RETRY_AFTER_MS_KEY``);
    a partial upload keeps what was written, so the retry resumes at the offset ``GetUploadStatus`` reports."""

    status = "RESOURCE_EXHAUSTED"
    retry_after_ms = 2000


class NotEnrolled(PermissionDenied):
    """A CA-signed site certificate that the federation's enrolment registry does not list."""


class Revoked(PermissionDenied):
    """The site or its certificate was revoked."""


class CertificateExpired(PermissionDenied):
    """The certificate expired after the connection it calls on was opened (TLS checks validity only at the
    handshake, so a long-lived connection would otherwise outlive it)."""

    status = "UNAUTHENTICATED"


class InvalidState(CoordinatorError):
    """The federation is not in a state that allows the request (e.g. resume while not paused)."""

    status = "FAILED_PRECONDITION"


class LateUpdate(CoordinatorError):
    """An update for a round that already closed, refused under ``quorum.late_policy = "drop"`` (or with no later
    round to carry it into)."""

    status = "FAILED_PRECONDITION"


class RoundBusy(CoordinatorError):
    """The round is closing; a late update to be carried into the next round is to be retried once it opens."""

    status = "ABORTED"


class FederationStopped(Exception):
    """The federation reached a terminal failure that the store keeps (a secure round that failed): no restart can
    get past it, so the coordinator reports it in one line and exits with :data:`EXIT_FEDERATION_STOPPED` on every
    start instead of crash-looping. Not a refusal of one call (no gRPC status)."""

    def __init__(self, round: int, reason: str) -> None:
        super().__init__(f"federation stopped: secure round {round} failed: {reason}")
        self.round, self.reason = round, reason


# Exit status of ``fedbridge-admin serve`` for a :class:`FederationStopped` (1 is a crash a restart may cure, 2 a
# configuration error): a supervisor should not restart on it (systemd ``RestartPreventExitStatus=3``).
EXIT_FEDERATION_STOPPED = 3
