"""The sidecar's one error hierarchy and its mapping to gRPC status codes.

Everything below the server raises these; ``server.py`` is the only place that turns
them into an aborted RPC (or a per-event status in a batch). Losing a lock race is
not an error: lock backends return ``None`` for that.
"""

from __future__ import annotations

import grpc


class SidecarError(Exception):
    """Base class: a failure a caller can be told about, with what to do next."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ConfigError(SidecarError):
    """The sidecar's configuration is invalid or conflicts with the servers' state."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidEvent(SidecarError):
    """The request cannot be published as it is; the message says what to fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(SidecarError):
    """The RPC lacks the shared token (--auth-token-file), or sent another one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class LimitExceeded(SidecarError):
    """A configured limit is reached (e.g. --max-streams); retry later or raise it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class IdempotencyKeyReused(SidecarError):
    """The idempotency key was already used for a different event of this entity."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PreconditionFailed(SidecarError):
    """The entity is not where the caller said (expected_sequence), or the version is stale."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LeaseLost(SidecarError):
    """The caller's lease expired, was lost, or is unknown here: re-acquire and redo the work."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class LeaseNotFound(SidecarError):
    """ReleaseLease of a lease this sidecar does not hold (expired, released or foreign)."""

    code = grpc.StatusCode.NOT_FOUND


class Contention(SidecarError):
    """Other producers kept this entity busy; retrying with the same key is safe."""

    code = grpc.StatusCode.ABORTED


class FencingConflict(Contention):
    """The broker refused a publish: the entity's subject moved on since we read it.

    Raised when ``Nats-Expected-Last-Subject-Sequence`` no longer matches, i.e. another
    sidecar published this entity (our lock was lost, or never held). The publisher
    re-reads the entity and tries again; it reaches a caller only when retries run out.
    """


class ForeignMessage(SidecarError):
    """A message on an entity subject lacks a valid Entity-Sequence header."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EarlierEventFailed(SidecarError):
    """A batch event was skipped because an earlier event of its entity failed.

    ABORTED when that failure may pass on a retry (send both again, in order, with the
    same keys); FAILED_PRECONDITION when it will not, so that no client resends the later
    events without the earlier one.
    """

    def __init__(self, message: str, earlier: SidecarError) -> None:
        super().__init__(message)
        retryable = earlier.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        self.code = grpc.StatusCode.ABORTED if retryable else grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(SidecarError):
    """NATS or the lock backend cannot be reached, or an outcome is unknown.

    Retrying with the same idempotency key is safe.
    """

    code = grpc.StatusCode.UNAVAILABLE


class LockBackendUnavailable(Unavailable):
    """The lock backend could not answer (too few servers reachable)."""


class ShuttingDown(Unavailable):
    """The sidecar is stopping and takes no new work."""


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a caller should see for *error*."""
    if isinstance(error, SidecarError):
        return error.code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
