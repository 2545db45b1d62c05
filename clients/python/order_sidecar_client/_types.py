"""Plain data shared by the sync and asyncio clients."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from ordersidecar.v1 import sidecar_pb2

OPERATIONS = {
    "create": sidecar_pb2.OPERATION_CREATE,
    "update": sidecar_pb2.OPERATION_UPDATE,
    "delete": sidecar_pb2.OPERATION_DELETE,
}
# Safe to retry because every retry carries the event's idempotency key. CANCELLED is here
# because a stopping server cancels calls still in transit; a caller's own cancellation
# surfaces as asyncio.CancelledError (or KeyboardInterrupt) and is never retried.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class Event:
    """One entity change event.

    ``idempotency_key`` defaults to a fresh UUID, made once per Event, so every retry of
    this Event is deduplicated by the stream.
    """

    entity_type: str
    entity_id: str
    operation: str
    payload: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: Publish only if the entity's last sequence is this (0: no event yet).
    expected_sequence: int | None = None
    #: Your own monotonic version of the entity; a stale one is refused.
    entity_version: int | None = None

    def __post_init__(self) -> None:
        if self.operation.lower() not in OPERATIONS:
            raise ValueError(f"operation {self.operation!r} is not one of {', '.join(OPERATIONS)}")

    def to_request(self, lease_id: str = "") -> sidecar_pb2.PublishRequest:
        """The gRPC request (under *lease_id* when given)."""
        request = sidecar_pb2.PublishRequest(
            entity_type=self.entity_type,
            entity_id=self.entity_id,
            operation=OPERATIONS[self.operation.lower()],
            payload=self.payload,
            headers=dict(self.headers),
            idempotency_key=self.idempotency_key,
            lease_id=lease_id,
        )
        if self.expected_sequence is not None:
            request.expected_sequence = self.expected_sequence
        if self.entity_version is not None:
            request.entity_version = self.entity_version
        return request


@dataclass(frozen=True)
class Published:
    """Where an event is in the stream."""

    sequence: int
    stream_sequence: int
    subject: str
    duplicate: bool

    @classmethod
    def from_response(cls, response: sidecar_pb2.PublishResponse) -> Published:
        """Build from the gRPC response."""
        return cls(
            response.sequence, response.stream_sequence, response.subject, response.duplicate
        )


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as the sidecar granted or renewed it."""

    lease_id: str
    entity_type: str
    entity_id: str
    #: The entity's last sequence when the lease was acquired (0: no event yet).
    fencing_token: int
    #: The entity's last Entity-Version when acquired, if it had one.
    last_version: int | None
    #: When the lease ends unless renewed.
    expires_at: datetime
    ttl: float

    @classmethod
    def from_reply(cls, reply: sidecar_pb2.Lease) -> LeaseInfo:
        """Build from the gRPC reply."""
        return cls(
            lease_id=reply.lease_id,
            entity_type=reply.entity_type,
            entity_id=reply.entity_id,
            fencing_token=reply.fencing_token,
            last_version=reply.last_version if reply.HasField("last_version") else None,
            expires_at=reply.expires_at.ToDatetime(tzinfo=UTC),
            ttl=reply.ttl.ToNanoseconds() / 1e9,
        )


def acquire_request(
    entity_type: str, entity_id: str, ttl: float, wait: float
) -> sidecar_pb2.AcquireLeaseRequest:
    """An AcquireLeaseRequest."""
    request = sidecar_pb2.AcquireLeaseRequest(entity_type=entity_type, entity_id=entity_id)
    request.ttl.FromNanoseconds(int(ttl * 1e9))
    request.wait_timeout.FromNanoseconds(int(wait * 1e9))
    return request


def check_lease_entity(info: LeaseInfo, event: Event) -> None:
    """Refuse, before any call, an event of another entity than the lease's."""
    if (info.entity_type, info.entity_id) != (event.entity_type, event.entity_id):
        raise ValueError(
            f"lease is for {info.entity_type}/{info.entity_id}, "
            f"event is for {event.entity_type}/{event.entity_id}"
        )


class SidecarError(Exception):
    """The sidecar refused or could not complete a publish; ``code`` says which way."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """Whether sending the same event again (same idempotency key) may succeed."""
        return self.code in RETRYABLE

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> SidecarError:
        """Wrap a grpc error."""
        # Sync errors are grpc.Call; asyncio's AioRpcError is not, but has the same methods.
        code_of, details_of = getattr(error, "code", None), getattr(error, "details", None)
        code = code_of() if callable(code_of) else None
        details = details_of() if callable(details_of) else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_result(cls, result: sidecar_pb2.PublishResult) -> SidecarError:
        """Wrap one failed batch result."""
        code = next((c for c in grpc.StatusCode if c.value[0] == result.code), None)
        return cls(code or grpc.StatusCode.UNKNOWN, result.message)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED and CANCELLED, same idempotency key."""

    attempts: int = 6
    first_backoff: float = 0.05
    max_backoff: float = 2.0
    attempt_timeout: float = 10.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number *attempt* (1-based), with full jitter."""
        return random.uniform(0, min(self.max_backoff, self.first_backoff * 2 ** (attempt - 1)))


BatchResult = Published | SidecarError


def batch_results(response: sidecar_pb2.PublishBatchResponse, count: int) -> list[BatchResult]:
    """Per-event results of a batch response."""
    if len(response.results) != count:
        raise SidecarError(
            grpc.StatusCode.INTERNAL,
            f"sidecar answered {len(response.results)} results for {count} events",
        )
    return [_result_of(r) for r in response.results]


def stream_results(response: sidecar_pb2.PublishStreamResponse) -> list[tuple[str, BatchResult]]:
    """The tagged results of one PublishStream response, packed or single."""
    if response.results:
        return [(tagged.tag, _result_of(tagged.result)) for tagged in response.results]
    return [(response.tag, _result_of(response.result))]


def _result_of(result: sidecar_pb2.PublishResult) -> BatchResult:
    if result.code == 0:
        return Published.from_response(result.response)
    return SidecarError.from_result(result)


# Bounds of one packed PublishStreamRequest: what is queued goes in one message, up to
# this many events or about this many bytes (well under the sidecar's default 4 MiB
# --max-message-bytes; an event larger than this goes alone).
PACK_EVENTS = 256
PACK_BYTES = 1024 * 1024
# A TaggedEvent's framing beside its tag and event: field keys and length varints.
_TAGGED_OVERHEAD = 12

#: An event queued for a stream: its tag, the event, and its request.
Queued = tuple[str, Event, sidecar_pb2.PublishRequest]


def queued(number: int, event: Event) -> Queued:
    """The *number*-th event of a stream, tagged by its number."""
    return str(number), event, event.to_request()


def pack(first: Queued, ready: Callable[[], Queued | None]) -> tuple[list[Queued], Queued | None]:
    """*first* and the events *ready* gives without waiting (None: none ready), within
    the bounds of one message; and the event taken that did not fit, if any."""
    batch, size = [first], _wire_size(first)
    while len(batch) < PACK_EVENTS:
        item = ready()
        if item is None:
            break
        item_size = _wire_size(item)
        if size + item_size > PACK_BYTES:
            return batch, item
        batch.append(item)
        size += item_size
    return batch, None


def _wire_size(item: Queued) -> int:
    return item[2].ByteSize() + len(item[0]) + _TAGGED_OVERHEAD


def stream_request(batch: Sequence[Queued]) -> sidecar_pb2.PublishStreamRequest:
    """One packed PublishStream message of *batch*."""
    return sidecar_pb2.PublishStreamRequest(
        events=[sidecar_pb2.TaggedEvent(tag=tag, event=request) for tag, _, request in batch]
    )
