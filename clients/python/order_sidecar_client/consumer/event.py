"""An entity event as the consumer hands it to a handler, parsed from the wire format."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.aio.msg import Msg

from order_sidecar_client.contract import (
    HEADER_ENTITY_ID,
    HEADER_ENTITY_OPERATION,
    HEADER_ENTITY_SEQUENCE,
    HEADER_ENTITY_TYPE,
    HEADER_ENTITY_VERSION,
    partition_of_subject,
)

__all__ = [
    "HEADER_ENTITY_ID",
    "HEADER_ENTITY_TYPE",
    "EntityEvent",
    "EntityKey",
    "MalformedEvent",
    "malformed_event",
    "parse_headers",
    "parse_msg",
]


@dataclass(frozen=True)
class EntityKey:
    """One entity: its type and id."""

    entity_type: str
    entity_id: str


@dataclass(frozen=True)
class EntityEvent:
    """One event of an entity, from the stream (or re-read for a replay)."""

    key: EntityKey
    sequence: int
    operation: str
    payload: bytes
    subject: str
    stream_sequence: int
    deliveries: int = 1
    version: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def partition(self) -> int:
        """The partition token of the subject ``{prefix}.{type}.{partition}.{token}``."""
        return partition_of_subject(self.subject)


class MalformedEvent(ValueError):
    """A message without valid entity headers (type, id, a positive decimal sequence)."""


def parse_headers(
    headers: dict[str, str] | None,
    subject: str,
    payload: bytes,
    stream_sequence: int,
    deliveries: int = 1,
) -> EntityEvent:
    """Build an event from wire headers; :class:`MalformedEvent` if missing or invalid."""
    headers = dict(headers or {})
    for name in (HEADER_ENTITY_TYPE, HEADER_ENTITY_ID, HEADER_ENTITY_SEQUENCE):
        if not headers.get(name):
            raise MalformedEvent(f"malformed: no {name} header on {subject}")
    raw = headers[HEADER_ENTITY_SEQUENCE]
    if not (raw.isascii() and raw.isdigit() and int(raw) > 0):
        raise MalformedEvent(
            f"malformed: {HEADER_ENTITY_SEQUENCE} {raw!r} on {subject} is not a positive integer"
        )
    version = headers.get(HEADER_ENTITY_VERSION)
    return EntityEvent(
        key=EntityKey(headers[HEADER_ENTITY_TYPE], headers[HEADER_ENTITY_ID]),
        sequence=int(raw),
        operation=headers.get(HEADER_ENTITY_OPERATION, ""),
        payload=payload,
        subject=subject,
        stream_sequence=stream_sequence,
        deliveries=deliveries,
        version=int(version) if version and version.isdigit() else None,
        headers=headers,
    )


def malformed_event(
    headers: dict[str, str] | None,
    subject: str,
    payload: bytes,
    stream_sequence: int,
    deliveries: int = 1,
) -> EntityEvent:
    """A malformed message as an event to dead-letter: its original headers unchanged,
    the entity from them where present (else ``_malformed/_``), sequence 0."""
    headers = dict(headers or {})
    key = EntityKey(
        headers.get(HEADER_ENTITY_TYPE) or "_malformed", headers.get(HEADER_ENTITY_ID) or "_"
    )
    return EntityEvent(
        key=key,
        sequence=0,
        operation=headers.get(HEADER_ENTITY_OPERATION, ""),
        payload=payload,
        subject=subject,
        stream_sequence=stream_sequence,
        deliveries=deliveries,
        headers=headers,
    )


def parse_msg(msg: Msg) -> EntityEvent:
    """The event in a JetStream message, with its delivery count."""
    meta = msg.metadata
    return parse_headers(
        msg.headers, msg.subject, msg.data, meta.sequence.stream, int(meta.num_delivered)
    )
