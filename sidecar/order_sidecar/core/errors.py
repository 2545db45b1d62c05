"""The sidecar's one error hierarchy: every failure a caller can be told about.

::

    SidecarError (kind INTERNAL)
    ├── ConfigError             CONFIG         the configuration conflicts with the servers
    ├── InvalidEvent            INVALID        the request cannot be published as it is
    ├── Unauthenticated         UNAUTHENTICATED
    ├── LimitExceeded           LIMIT          a configured limit is reached
    ├── IdempotencyKeyReused    PRECONDITION   the key names another event of the entity
    ├── PreconditionFailed      PRECONDITION   expected_sequence / entity_version refused
    ├── LeaseLost               PRECONDITION   the caller's lease is gone: redo the work
    ├── LeaseNotFound           NOT_FOUND
    ├── ForeignMessage          PRECONDITION   a message without Entity-Sequence
    ├── EarlierEventFailed      CONFLICT or PRECONDITION, after the earlier failure
    ├── Contention              CONFLICT       other producers kept the entity busy
    │   └── FencingConflict                    the broker refused a stale append
    └── Unavailable             UNAVAILABLE    a server is unreachable, or the outcome unknown
        ├── LockBackendUnavailable
        ├── ShuttingDown
        ├── OutcomeUnknown                     no ack: the stream must be read to know
        └── BatchRefused                       an atomic batch stored nothing (split it)

Each error carries a :class:`ErrorKind` and whether a retry with the same idempotency key
may succeed (``retryable``). Nothing here knows gRPC: ``order_sidecar.rpc.status`` holds
the one table from kinds to status codes. Losing a lock race is not an error: lock
backends return ``None`` for that.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What kind of failure an error is; the gRPC edge maps each kind to one status code."""

    INTERNAL = "internal"
    CONFIG = "config"
    INVALID = "invalid"
    UNAUTHENTICATED = "unauthenticated"
    LIMIT = "limit"
    PRECONDITION = "precondition"
    NOT_FOUND = "not found"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"


#: Kinds whose failure may pass when the same request is sent again (same idempotency key).
RETRYABLE_KINDS = frozenset({ErrorKind.CONFLICT, ErrorKind.UNAVAILABLE})


class SidecarError(Exception):
    """Base class: a failure a caller can be told about, with what to do next."""

    kind: ErrorKind = ErrorKind.INTERNAL

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again (same idempotency key) may succeed."""
        return self.kind in RETRYABLE_KINDS


class ConfigError(SidecarError):
    """The sidecar's configuration is invalid or conflicts with the servers' state."""

    kind = ErrorKind.CONFIG


class InvalidEvent(SidecarError):
    """The request cannot be published as it is; the message says what to fix."""

    kind = ErrorKind.INVALID


class Unauthenticated(SidecarError):
    """The RPC lacks the shared token (--auth-token-file), or sent another one."""

    kind = ErrorKind.UNAUTHENTICATED


class LimitExceeded(SidecarError):
    """A configured limit is reached (e.g. --max-streams); retry later or raise it."""

    kind = ErrorKind.LIMIT


class IdempotencyKeyReused(SidecarError):
    """The idempotency key was already used for a different event of this entity."""

    kind = ErrorKind.PRECONDITION


class PreconditionFailed(SidecarError):
    """The entity is not where the caller said (expected_sequence), or the version is stale."""

    kind = ErrorKind.PRECONDITION


class LeaseLost(SidecarError):
    """The caller's lease expired, was lost, or is unknown here: re-acquire and redo the work."""

    kind = ErrorKind.PRECONDITION


class LeaseNotFound(SidecarError):
    """ReleaseLease of a lease this sidecar does not hold (expired, released or foreign)."""

    kind = ErrorKind.NOT_FOUND


class Contention(SidecarError):
    """Other producers kept this entity busy; retrying with the same key is safe."""

    kind = ErrorKind.CONFLICT


class FencingConflict(Contention):
    """The broker refused a publish: the entity's subject moved on since we read it.

    Raised when ``Nats-Expected-Last-Subject-Sequence`` no longer matches, i.e. another
    sidecar published this entity (our lock was lost, or never held). The publisher
    re-reads the entity and tries again; it reaches a caller only when retries run out.
    """


class ForeignMessage(SidecarError):
    """A message on an entity subject lacks a valid Entity-Sequence header."""

    kind = ErrorKind.PRECONDITION


class EarlierEventFailed(SidecarError):
    """A batch event was skipped because an earlier event of its entity failed.

    CONFLICT when that failure may pass on a retry (send both again, in order, with the
    same keys); PRECONDITION when it will not, so that no client resends the later events
    without the earlier one.
    """

    def __init__(self, message: str, earlier: SidecarError) -> None:
        super().__init__(message)
        self.kind = ErrorKind.CONFLICT if earlier.retryable else ErrorKind.PRECONDITION


class Unavailable(SidecarError):
    """NATS or the lock backend cannot be reached, or an outcome is unknown.

    Retrying with the same idempotency key is safe.
    """

    kind = ErrorKind.UNAVAILABLE


class LockBackendUnavailable(Unavailable):
    """The lock backend could not answer (too few servers reachable)."""


class ShuttingDown(Unavailable):
    """The sidecar is stopping and takes no new work."""


class OutcomeUnknown(Unavailable):
    """No ack came for an append or a batch: it may be stored or not; read the stream.

    A caller told this retries with the same idempotency key, which is safe.
    """


class BatchRefused(Unavailable):
    """The log refused an atomic batch as a whole and stored none of it.

    Internal to the group committer, which then appends the batch's events one by one
    (so each gets the answer that is its own: a fencing conflict, a duplicate, ...).
    ``fenced``: the broker said an expected last sequence was stale.
    """

    def __init__(self, message: str, *, fenced: bool = False) -> None:
        super().__init__(message)
        self.fenced = fenced


def internal_error(error: BaseException) -> SidecarError:
    """*error*, unexplained, as the SidecarError a caller is told (its kind INTERNAL)."""
    if isinstance(error, SidecarError):
        return error
    return SidecarError(f"internal error: {type(error).__name__}: {error}")
