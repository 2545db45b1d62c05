"""The core's two ports: the event log it appends to, and the lock service it uses.

Adapters implement them (``order_sidecar.jetstream.stream.EventStream``, one module per
lock backend in ``order_sidecar.locks``); the core depends on nothing but these.

Locks are the fast path that keeps sidecars from contending for an entity; order does
not rest on them (the broker's fencing check does). So the contract is small:
losing a race is a result (``None``), a backend that cannot answer raises
``LockBackendUnavailable``, and a lease may be lost at any time without notice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from order_sidecar.core.model import Append, EntityPosition, Event, Stored


@dataclass(slots=True)
class Lease:
    """A held lock on one key.

    ``handle`` is the backend's own state for the lease; callers never look inside.
    """

    key: str
    ttl: float
    handle: object
    #: time.monotonic() when the successful attempt began: the lock's TTL runs from no
    #: earlier than this, so a holder that counts from here never outlives its lock.
    started: float = 0.0


@runtime_checkable
class LockBackend(Protocol):
    """A distributed lock service keyed by string."""

    name: str

    async def acquire(self, key: str, ttl: float, wait: float) -> Lease | None:
        """Take *key* for *ttl* seconds, waiting up to *wait* seconds for its holder.

        Returns ``None`` when someone else held it for the whole wait. Raises
        ``LockBackendUnavailable`` when the backend cannot decide.
        """
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend *lease* by its ttl. ``False``: it is no longer ours.

        Raises ``LockBackendUnavailable`` when the backend cannot tell (the lease may
        still hold; try again before its TTL runs out).
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give *lease* up. Never raises for a lease that already expired."""
        ...

    def on_wanted(self, handler: Callable[[str], None]) -> None:
        """Have *handler(key)* called when another sidecar starts waiting for *key*.

        Best effort: a holder that hears it hands the lock over instead of keeping it
        for its own next request; one that does not gives it up when it idles.
        """
        ...

    async def healthy(self) -> bool:
        """Whether the backend answers now (for health checks and metrics)."""
        ...

    async def close(self) -> None:
        """Close connections."""
        ...


class Appender(Protocol):
    """Where the publisher's fenced appends go: the log itself, or a group committer."""

    async def append(self, subject: str, event: Event, after: EntityPosition) -> Stored:
        """Append *event* as its entity's next event, only if *after* is still its last."""
        ...


class EventLog(Protocol):
    """The stream entity events are appended to, with a broker-checked fence.

    Raises ``FencingConflict`` when an append's expected position is stale, ``Unavailable``
    when the outcome is unknown.
    """

    @property
    def max_payload(self) -> int:
        """Largest message the log accepts, headers included."""
        ...

    def subject_for(self, event: Event) -> str:
        """The subject of *event*'s entity."""
        ...

    def subject_of(self, entity_type: str, entity_id: str) -> str:
        """The subject of an entity."""
        ...

    async def position(self, subject: str, *, from_leader: bool = False) -> EntityPosition:
        """The entity's last event on *subject* (0, 0 when it has none)."""
        ...

    async def append(self, subject: str, event: Event, after: EntityPosition) -> Stored:
        """Append *event* as the entity's next event, only if *after* is still its last."""
        ...


class BatchLog(EventLog, Protocol):
    """An EventLog that can also append many entities' events as one atomic batch."""

    async def append_batch(self, appends: Sequence[Append]) -> list[Stored]:
        """Store every append or none; one Stored per append, in order.

        Raises ``BatchRefused`` when the log stored none of them (a stale fence, a
        duplicate, a limit: the caller splits the batch), ``OutcomeUnknown`` when no ack
        came (the caller reads the stream to learn what was stored).
        """
        ...
