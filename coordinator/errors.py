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


class InvalidState(CoordinatorError):
    """The federation is not in a state that allows the request (e.g. resume while not paused)."""

    status = "FAILED_PRECONDITION"
