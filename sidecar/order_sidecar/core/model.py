"""The ordering core's model: an event to publish, where an entity stands, what was stored.

Plain values only: no gRPC, protobuf or NATS types, so every layer can share them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from order_sidecar_client import contract


@dataclass(frozen=True, slots=True)
class Event:
    """One validated entity change event."""

    entity_type: str
    entity_id: str
    operation: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    lease_id: str = ""
    expected_sequence: int | None = None
    entity_version: int | None = None

    @property
    def entity_key(self) -> tuple[str, str]:
        """What orders events: one sequence per (type, id)."""
        return (self.entity_type, self.entity_id)

    def header_bytes(self) -> int:
        """Rough size of the caller's headers on the wire."""
        return sum(len(k) + len(v.encode("utf-8")) + 4 for k, v in self.headers.items())


@dataclass(frozen=True, slots=True)
class EntityPosition:
    """Where an entity stands: its last event's Entity-Sequence, stream sequence,
    Entity-Version (None when that event has none) and Nats-Msg-Id."""

    sequence: int
    stream_sequence: int
    version: int | None = None
    msg_id: str = ""
    digest: str = ""

    def after(self, stored: Stored, event: Event) -> EntityPosition:
        """The entity's position once *stored* (the append of *event*) is its last event."""
        return EntityPosition(
            stored.sequence,
            stored.stream_sequence,
            event.entity_version,
            contract.msg_id(event.entity_type, event.entity_id, event.idempotency_key),
            event_digest(event),
        )


@dataclass(frozen=True, slots=True)
class Append:
    """One append: *event* goes to *subject* as the event after *after*.

    Fenced: only if *after* is still the subject's last (its stream sequence is the
    broker's expected last subject sequence). In an atomic batch only an entity's first
    append is fenced; the others follow it inside the same batch.
    """

    subject: str
    event: Event
    after: EntityPosition
    fenced: bool = True


@dataclass(frozen=True, slots=True)
class Stored:
    """An event that is in the stream."""

    sequence: int
    stream_sequence: int
    subject: str
    duplicate: bool


def event_digest(event: Event) -> str:
    """What tells two events with one idempotency key apart: operation and payload."""
    return payload_digest(event.operation, event.payload)


def payload_digest(operation: str, payload: bytes) -> str:
    """A short digest of an operation and payload (what a stored event is compared by)."""
    return hashlib.sha256(operation.encode() + b"\0" + payload).hexdigest()[:32]
