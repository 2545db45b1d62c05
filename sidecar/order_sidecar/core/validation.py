"""The rules an event must meet before anything touches NATS: plain values in,
InvalidEvent (saying what to fix) out."""

from __future__ import annotations

import re

from order_sidecar_client import contract

from order_sidecar.core.errors import InvalidEvent
from order_sidecar.core.model import Event

MAX_ENTITY_ID_BYTES = 256
MAX_IDEMPOTENCY_KEY = 128
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8192
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]{1,128}")


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
    check_entity_type(entity_type)
    check_entity_id(entity_id)


def check_entity_type(entity_type: str) -> None:
    """Raise InvalidEvent unless *entity_type* is a valid subject token."""
    if not contract.is_entity_type(entity_type):
        raise InvalidEvent(
            f"entity_type {shown(entity_type)} is invalid: use 1-64 characters of [A-Za-z0-9_-], "
            "e.g. 'patient'"
        )


def check_entity_id(entity_id: str) -> None:
    """Raise InvalidEvent unless *entity_id* can travel in a header unchanged."""
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


def check_headers(headers: dict[str, str]) -> None:
    """Raise InvalidEvent unless the caller's headers are valid and not reserved."""
    if len(headers) > MAX_HEADERS:
        raise InvalidEvent(f"at most {MAX_HEADERS} headers are allowed, got {len(headers)}")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise InvalidEvent(
                f"header name {shown(name)} is invalid: use 1-128 token characters "
                "(letters, digits and !#$%&'*+-.^_`|~)"
            )
        if contract.is_reserved_header(name):
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


def check_idempotency_key(key: str) -> None:
    """Raise InvalidEvent unless *key* is empty (one is generated) or printable ASCII."""
    if key and not _PRINTABLE_ASCII.fullmatch(key):
        raise InvalidEvent(
            f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters "
            "without spaces"
        )
