"""The contract between producers, the sidecar and consumers, in one place.

Header names, subjects and entity tokens, the partition hash, message ids and lock keys.
The sidecar, the ordered consumer, ``order-sidecar verify`` and ``dlq`` all import these
rules from here, and this module is the single source of docs/wire-format.md: consumers
in any language rely on exactly these rules, so they never change within a major version.
It imports nothing beyond the standard library.
"""

from __future__ import annotations

import base64
import re
from typing import Final

HEADER_ENTITY_TYPE: Final = "Entity-Type"
HEADER_ENTITY_ID: Final = "Entity-Id"
HEADER_ENTITY_SEQUENCE: Final = "Entity-Sequence"
HEADER_ENTITY_OPERATION: Final = "Entity-Operation"
HEADER_ENTITY_VERSION: Final = "Entity-Version"
HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE: Final = "Nats-Expected-Last-Subject-Sequence"
# JetStream's atomic batch publish (ADR-50): the sidecar's group commit sets these.
HEADER_BATCH_ID: Final = "Nats-Batch-Id"
HEADER_BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
HEADER_BATCH_COMMIT: Final = "Nats-Batch-Commit"
RESERVED_HEADER_PREFIXES: Final = ("nats-", "entity-")

OPERATIONS: Final = ("create", "update", "delete")

ENTITY_TYPE_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
_ENTITY_TYPE = re.compile(ENTITY_TYPE_PATTERN)
_RAW_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
ENCODED_TOKEN_MARK: Final = "_"

_FNV32_OFFSET: Final = 0x811C9DC5
_FNV32_PRIME: Final = 0x01000193


def is_entity_type(entity_type: str) -> bool:
    """Whether *entity_type* is valid: 1-64 characters of ``[A-Za-z0-9_-]`` (a subject token)."""
    return _ENTITY_TYPE.fullmatch(entity_type) is not None


def entity_token(entity_id: str) -> str:
    """The subject token for *entity_id*: safe for NATS, and unique per id.

    An id of 1-64 characters from ``[A-Za-z0-9_-]`` that does not start with ``_`` is
    its own token. Any other id becomes ``_`` followed by the unpadded URL-safe base64
    of its UTF-8 bytes. Raw tokens never start with ``_`` and base64 is injective, so
    two different ids never share a token.
    """
    if _RAW_TOKEN.fullmatch(entity_id):
        return entity_id
    encoded = base64.urlsafe_b64encode(entity_id.encode("utf-8")).rstrip(b"=")
    return ENCODED_TOKEN_MARK + encoded.decode("ascii")


def entity_id_from_token(token: str) -> str:
    """Invert :func:`entity_token`."""
    if not token.startswith(ENCODED_TOKEN_MARK):
        return token
    body = token[len(ENCODED_TOKEN_MARK) :]
    padded = body + "=" * (-len(body) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")


def partition_of(entity_id: str, partitions: int) -> int:
    """FNV-1a (32 bit) of the id's UTF-8 bytes, modulo *partitions*."""
    digest = _FNV32_OFFSET
    for byte in entity_id.encode("utf-8"):
        digest ^= byte
        digest = (digest * _FNV32_PRIME) & 0xFFFFFFFF
    return digest % partitions


def subject_for(prefix: str, entity_type: str, entity_id: str, partitions: int) -> str:
    """``{prefix}.{entity_type}.{partition}.{entity_token}``."""
    partition = partition_of(entity_id, partitions)
    return f"{prefix}.{entity_type}.{partition}.{entity_token(entity_id)}"


def partition_of_subject(subject: str) -> int:
    """The partition token of an entity subject ``{prefix}.{type}.{partition}.{token}``."""
    return int(subject.split(".")[-2])


def msg_id(entity_type: str, entity_id: str, idempotency_key: str) -> str:
    """The ``Nats-Msg-Id``: JetStream deduplicates stream-wide, so scope it per entity."""
    return f"{entity_type}:{entity_token(entity_id)}:{idempotency_key}"


def is_reserved_header(name: str) -> bool:
    """Whether *name* is set by the sidecar or NATS and may not come from a caller."""
    return name.lower().startswith(RESERVED_HEADER_PREFIXES)


def lock_key(stream: str, entity_type: str, entity_id: str) -> str:
    """The name of an entity's lock: ``{stream}:{entity_type}:{entity_token}``.

    Unique per stream, type and id, and the same in every sidecar, whichever backend
    holds it (the Redis key and the KV key are built from it).
    """
    return f"{stream}:{entity_type}:{entity_token(entity_id)}"


def entity_type_of_lock_key(key: str) -> str:
    """The entity type inside a :func:`lock_key` (for logs and metrics, never the id)."""
    parts = key.split(":")
    return parts[1] if len(parts) > 2 else "?"
