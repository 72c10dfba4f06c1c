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


class LateUpdate(CoordinatorError):
    """An update for a round that already closed, refused under ``quorum.late_policy = "drop"`` (or with no later
    round to carry it into)."""

    status = "FAILED_PRECONDITION"


class RoundBusy(CoordinatorError):
    """The round is closing; a late update to be carried into the next round is to be retried once it opens."""

    status = "ABORTED"
