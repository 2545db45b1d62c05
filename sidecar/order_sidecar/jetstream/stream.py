"""The JetStream side: stream provisioning, entity positions and fenced appends."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import RawStreamMsg, RetentionPolicy, StorageType, StreamConfig
from order_sidecar_client import contract

from order_sidecar.core.errors import (
    ConfigError,
    FencingConflict,
    ForeignMessage,
    IdempotencyKeyReused,
    InvalidEvent,
    Unavailable,
)
from order_sidecar.core.model import EntityPosition, Event, Stored, payload_digest

log = logging.getLogger(__name__)

ERR_WRONG_LAST_SEQUENCE = 10071
ERR_MESSAGE_TOO_LARGE = 10054
ERR_STREAM_NAME_IN_USE = 10058
META_PREFIX = "ordersidecar.subject_prefix"
META_PARTITIONS = "ordersidecar.partitions"
# Any other client-side NATS failure (no responders while a stream leader is elected,
# timeouts, a closed connection, ...): the outcome is unknown, so callers retry with
# their idempotency key. API errors with a code are told apart where they are caught.
_NATS_DOWN = (nats.errors.Error, asyncio.TimeoutError)


class StreamSettings(Protocol):
    """What the adapter needs to know of its stream (``runtime.config.NatsOptions``)."""

    @property
    def stream(self) -> str: ...
    @property
    def subject_prefix(self) -> str: ...
    @property
    def partitions(self) -> int: ...
    @property
    def stream_replicas(self) -> int: ...
    @property
    def duplicate_window(self) -> float: ...
    @property
    def publish_timeout(self) -> float: ...


class EventStream:
    """Reads and appends entity events on one JetStream stream."""

    def __init__(self, nc: NatsClient, options: StreamSettings) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=options.publish_timeout)
        self._jsm = nc.jsm(timeout=options.publish_timeout)
        self._options = options

    @property
    def max_payload(self) -> int:
        """Largest message the connected server accepts."""
        return int(self._nc.max_payload)

    def subject_for(self, event: Event) -> str:
        """The subject of *event*'s entity."""
        return self.subject_of(event.entity_type, event.entity_id)

    def subject_of(self, entity_type: str, entity_id: str) -> str:
        """The subject of an entity."""
        opts = self._options
        return contract.subject_for(opts.subject_prefix, entity_type, entity_id, opts.partitions)

    async def ensure_stream(self) -> None:
        """Create the stream, or check that an existing one fits; ConfigError if not."""
        desired = self._desired_config()
        try:
            info = await self._jsm.stream_info(self._options.stream)
        except nats.js.errors.NotFoundError:
            info = None
        except _NATS_DOWN as error:
            raise Unavailable(
                f"NATS JetStream did not answer ({type(error).__name__}): is JetStream enabled?"
            ) from error
        if info is None:
            try:
                await self._jsm.add_stream(desired)
                log.info("created stream %s for subjects %s", desired.name, desired.subjects)
                return
            except nats.js.errors.BadRequestError as error:
                if error.err_code != ERR_STREAM_NAME_IN_USE:
                    raise ConfigError(
                        f"cannot create stream {desired.name}: {error.description}"
                    ) from error
            info = await self._jsm.stream_info(self._options.stream)
        _check_existing(info.config, desired)

    def _desired_config(self) -> StreamConfig:
        opts = self._options
        return StreamConfig(
            name=opts.stream,
            description="entity change events, ordered per entity by nats-order-sidecar",
            subjects=[f"{opts.subject_prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=opts.stream_replicas,
            duplicate_window=opts.duplicate_window,
            allow_direct=True,
            metadata={META_PREFIX: opts.subject_prefix, META_PARTITIONS: str(opts.partitions)},
        )

    async def position(self, subject: str, *, from_leader: bool = False) -> EntityPosition:
        """The entity's last event on *subject* (0, 0 when it has none).

        A direct get may be answered by any replica; after a fencing conflict, ask the
        stream leader so the next attempt starts from the truth.
        """
        self._require_connection()
        try:
            msg = await self._jsm.get_last_msg(
                self._options.stream, subject, direct=not from_leader
            )
        except nats.js.errors.NotFoundError:
            return EntityPosition(0, 0)
        except _NATS_DOWN as error:
            raise Unavailable(
                f"NATS did not answer reading {subject} ({type(error).__name__}); retry later"
            ) from error
        headers = msg.headers or {}
        raw_version = headers.get(contract.HEADER_ENTITY_VERSION, "")
        return EntityPosition(
            _entity_sequence(msg),
            int(msg.seq or 0),
            int(raw_version) if raw_version.isdigit() else None,
            headers.get(contract.HEADER_MSG_ID, ""),
            payload_digest(headers.get(contract.HEADER_ENTITY_OPERATION, ""), msg.data or b""),
        )

    async def append(self, subject: str, event: Event, after: EntityPosition) -> Stored:
        """Publish *event* as the entity's next event, only if *after* is still its last.

        Raises FencingConflict when the broker says the subject moved on.
        """
        self._require_connection()
        sequence = after.sequence + 1
        headers = {
            **event.headers,
            contract.HEADER_ENTITY_TYPE: event.entity_type,
            contract.HEADER_ENTITY_ID: event.entity_id,
            contract.HEADER_ENTITY_SEQUENCE: str(sequence),
            contract.HEADER_ENTITY_OPERATION: event.operation,
            contract.HEADER_MSG_ID: contract.msg_id(
                event.entity_type, event.entity_id, event.idempotency_key
            ),
            contract.HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE: str(after.stream_sequence),
        }
        if event.entity_version is not None:
            headers[contract.HEADER_ENTITY_VERSION] = str(event.entity_version)
        try:
            ack = await self._js.publish(subject, event.payload, headers=headers)
        except nats.js.errors.APIError as error:
            raise _classify_publish_error(error, subject) from error
        except _NATS_DOWN as error:
            raise Unavailable(
                f"no publish ack from JetStream ({type(error).__name__}); the outcome is "
                "unknown: retry with the same idempotency_key"
            ) from error
        if ack.duplicate:
            return await self._original_of(subject, event, int(ack.seq))
        return Stored(sequence, int(ack.seq), subject, duplicate=False)

    def _require_connection(self) -> None:
        if not self._nc.is_connected:
            raise Unavailable(
                "not connected to NATS (reconnecting); nothing was published: retry later"
            )

    async def _original_of(self, subject: str, event: Event, stream_sequence: int) -> Stored:
        try:
            msg = await self._jsm.get_msg(self._options.stream, seq=stream_sequence, direct=True)
        except _NATS_DOWN as error:
            raise Unavailable(
                f"NATS did not answer reading a duplicate ({type(error).__name__}); retry "
                "with the same idempotency_key"
            ) from error
        headers = msg.headers or {}
        if (
            msg.subject != subject
            or headers.get(contract.HEADER_ENTITY_OPERATION) != event.operation
            or (msg.data or b"") != event.payload
        ):
            raise IdempotencyKeyReused(
                f"idempotency_key {event.idempotency_key!r} was already used for a different "
                f"event of this entity (stream sequence {stream_sequence}); use a new key "
                "for a new event"
            )
        return Stored(_entity_sequence(msg), stream_sequence, subject, duplicate=True)


def _entity_sequence(msg: RawStreamMsg) -> int:
    raw = (msg.headers or {}).get(contract.HEADER_ENTITY_SEQUENCE, "")
    if not raw.isdigit():
        raise ForeignMessage(
            f"message {msg.seq} on {msg.subject} has no valid {contract.HEADER_ENTITY_SEQUENCE} "
            "header: only the sidecar may publish under its subject prefix"
        )
    return int(raw)


def _classify_publish_error(error: nats.js.errors.APIError, subject: str) -> Exception:
    if error.err_code == ERR_WRONG_LAST_SEQUENCE:
        return FencingConflict(
            f"another producer published {subject} concurrently ({error.description}); "
            "retry with the same idempotency_key"
        )
    if error.err_code == ERR_MESSAGE_TOO_LARGE:
        return InvalidEvent(f"JetStream refused the event as too large: {error.description}")
    return Unavailable(f"JetStream refused the publish: {error.description}; retry later")


def _check_existing(actual: StreamConfig, desired: StreamConfig) -> None:
    problems = []
    if desired.subjects and desired.subjects[0] not in (actual.subjects or []):
        problems.append(f"subjects {actual.subjects} do not include {desired.subjects[0]}")
    if actual.storage != StorageType.FILE:
        problems.append(f"storage is {actual.storage}, not file")
    if actual.retention != RetentionPolicy.LIMITS:
        problems.append(f"retention is {actual.retention}, not limits (events would vanish)")
    if not actual.allow_direct:
        problems.append("allow_direct is off")
    if actual.duplicate_window != desired.duplicate_window:
        problems.append(
            f"duplicate_window is {actual.duplicate_window}s, --duplicate-window says "
            f"{desired.duplicate_window}s"
        )
    if (actual.num_replicas or 1) != desired.num_replicas:
        problems.append(
            f"replicas are {actual.num_replicas}, --stream-replicas says {desired.num_replicas}"
        )
    wanted_meta = desired.metadata or {}
    actual_meta = actual.metadata or {}
    for key in (META_PREFIX, META_PARTITIONS):
        if key in actual_meta and actual_meta[key] != wanted_meta[key]:
            problems.append(
                f"it was created with {key}={actual_meta[key]}, this sidecar uses "
                f"{wanted_meta[key]}: changing it would move entities to new subjects"
            )
    if problems:
        raise ConfigError(
            f"stream {actual.name} exists but does not fit: {'; '.join(problems)}. "
            "Use another --stream, or change the flags to match the stream."
        )
    if actual.max_age or (actual.max_msgs or -1) > 0 or (actual.max_bytes or -1) > 0:
        log.warning(
            "stream %s has age/count/size limits: when an entity's last event is removed, "
            "its sequence restarts at 1 (see docs/guarantees.md)",
            actual.name,
        )
