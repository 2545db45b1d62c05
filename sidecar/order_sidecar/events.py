"""An event to publish, validated from its gRPC request before anything touches NATS."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from ordersidecar.v1 import sidecar_pb2

from . import wire
from .errors import InvalidEvent

MAX_ENTITY_ID_BYTES = 256
MAX_IDEMPOTENCY_KEY = 128
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8192
_ENTITY_TYPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]{1,128}")
_OPERATION_NAMES = {
    sidecar_pb2.OPERATION_CREATE: "create",
    sidecar_pb2.OPERATION_UPDATE: "update",
    sidecar_pb2.OPERATION_DELETE: "delete",
}


@dataclass(frozen=True)
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


def event_from_request(request: sidecar_pb2.PublishRequest) -> Event:
    """Validate *request*; raise InvalidEvent saying what to fix."""
    _check_entity_type(request.entity_type)
    _check_entity_id(request.entity_id)
    operation = _OPERATION_NAMES.get(request.operation)
    if operation is None:
        raise InvalidEvent(
            f"operation {request.operation} is not allowed: use OPERATION_CREATE, "
            "OPERATION_UPDATE or OPERATION_DELETE"
        )
    headers = dict(request.headers)
    _check_headers(headers)
    key = request.idempotency_key
    if key and not _PRINTABLE_ASCII.fullmatch(key):
        raise InvalidEvent(
            f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters "
            "without spaces"
        )
    return Event(
        entity_type=request.entity_type,
        entity_id=request.entity_id,
        operation=operation,
        payload=request.payload,
        headers=headers,
        idempotency_key=key or f"gen-{uuid.uuid4().hex}",
        lease_id=request.lease_id,
        expected_sequence=(
            request.expected_sequence if request.HasField("expected_sequence") else None
        ),
        entity_version=request.entity_version if request.HasField("entity_version") else None,
    )


def check_size(event: Event, max_payload: int) -> None:
    """Refuse an event that NATS would refuse for its size."""
    overhead = 512 + event.header_bytes() + 2 * len(event.entity_id.encode("utf-8"))
    if len(event.payload) + overhead > max_payload:
        raise InvalidEvent(
            f"payload of {len(event.payload)} bytes is too large: the NATS server accepts "
            f"{max_payload} bytes per message including about {overhead} bytes of headers; "
            "store large blobs elsewhere and publish a reference"
        )


def shown(value: str, limit: int = 80) -> str:
    """*value* quoted for an error message, cut short: callers may send anything."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_entity(entity_type: str, entity_id: str) -> None:
    """Raise InvalidEvent unless the type and id are usable."""
    _check_entity_type(entity_type)
    _check_entity_id(entity_id)


def _check_entity_type(entity_type: str) -> None:
    if not _ENTITY_TYPE.fullmatch(entity_type):
        raise InvalidEvent(
            f"entity_type {shown(entity_type)} is invalid: use 1-64 characters of [A-Za-z0-9_-], "
            "e.g. 'patient'"
        )


def _check_entity_id(entity_id: str) -> None:
    size = len(entity_id.encode("utf-8"))
    if not 0 < size <= MAX_ENTITY_ID_BYTES:
        raise InvalidEvent(
            f"entity_id must be 1-{MAX_ENTITY_ID_BYTES} bytes of UTF-8, got {size} bytes"
        )
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in entity_id):
        raise InvalidEvent("entity_id must not contain control characters (such as CR, LF, tab)")
    if entity_id != entity_id.strip():
        raise InvalidEvent(
            "entity_id must not start or end with whitespace: NATS trims header values, "
            "so the Entity-Id header could not carry it unchanged"
        )


def _check_headers(headers: dict[str, str]) -> None:
    if len(headers) > MAX_HEADERS:
        raise InvalidEvent(f"at most {MAX_HEADERS} headers are allowed, got {len(headers)}")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise InvalidEvent(
                f"header name {shown(name)} is invalid: use 1-128 token characters "
                "(letters, digits and !#$%&'*+-.^_`|~)"
            )
        if wire.is_reserved_header(name):
            raise InvalidEvent(
                f"header {shown(name)} is reserved: names starting with 'Nats-' or 'Entity-' "
                "are set by the sidecar"
            )
        if "\r" in value or "\n" in value or value != value.strip():
            raise InvalidEvent(
                f"header {shown(name)} value must not contain CR or LF nor start or end with "
                "whitespace (NATS trims header values)"
            )
    total = sum(len(k) + len(v.encode("utf-8")) for k, v in headers.items())
    if total > MAX_HEADER_BYTES:
        raise InvalidEvent(f"headers total {total} bytes; at most {MAX_HEADER_BYTES} allowed")
