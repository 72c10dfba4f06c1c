"""Domain errors of the coordinator. The servicer maps each to one gRPC status code."""

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


class NotEnrolled(PermissionDenied):
    """A CA-signed site certificate that the federation's enrolment registry does not list."""


class Revoked(PermissionDenied):
    """The site or its certificate was revoked."""
