"""The JetStream side: stream provisioning, entity positions and fenced appends."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import RawStreamMsg, RetentionPolicy, StorageType, StreamConfig
from order_sidecar_client import contract

from order_sidecar.core.errors import (
    BatchRefused,
    ConfigError,
    FencingConflict,
    ForeignMessage,
    IdempotencyKeyReused,
    InvalidEvent,
    OutcomeUnknown,
    Unavailable,
)
from order_sidecar.core.model import Append, EntityPosition, Event, Stored, payload_digest
from order_sidecar.jetstream.reads import BulkReads

log = logging.getLogger(__name__)

ERR_WRONG_LAST_SEQUENCE = 10071
# The subject has a write proposed but not yet applied (replicated streams): a race.
ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT = 10164
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
        #: Set by ensure_stream: whether append_batch may be used.
        self.atomic = False
        #: Concurrent reads coalesced into batched direct gets (servers 2.11+).
        self._bulk: BulkReads | None = None

    @property
    def max_payload(self) -> int:
        """Largest message the connected server accepts."""
        return int(self._nc.max_payload)

    @property
    def bulk_reads(self) -> tuple[int, int]:
        """Batched reads so far and the reads they answered (0, 0 without them)."""
        return (self._bulk.batches, self._bulk.batched_reads) if self._bulk else (0, 0)

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
                created = await self._jsm.add_stream(desired)
                log.info("created stream %s for subjects %s", desired.name, desired.subjects)
                self._learn_batches(created.config)
                return
            except nats.js.errors.BadRequestError as error:
                if error.err_code != ERR_STREAM_NAME_IN_USE:
                    raise ConfigError(
                        f"cannot create stream {desired.name}: {error.description}"
                    ) from error
            info = await self._jsm.stream_info(self._options.stream)
        _check_existing(info.config, desired)
        self._learn_batches(info.config)

    def _learn_batches(self, config: StreamConfig) -> None:
        """Whether atomic batches may be used: a server that knows them (2.12+; older
        ones would store each message of a "batch" on its own) and a stream that allows
        them. Either missing: group commit stays off and events go one by one."""
        version = self._nc.connected_server_version
        if (version.major, version.minor) >= (2, 11):
            self._bulk = BulkReads(
                self._nc,
                self._options.stream,
                self._read_last,
                _position_of,
                self._options.publish_timeout,
            )
        server_ok = (version.major, version.minor) >= (2, 12)
        self.atomic = server_ok and bool(config.allow_atomic)
        if server_ok and not config.allow_atomic:
            log.info(
                "stream %s has allow_atomic off: publishing one event per round trip (update "
                "the stream with allow_atomic to let the sidecar commit in groups)",
                config.name,
            )

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
            # Group commit (core/committer.py); servers before 2.12 drop the field.
            allow_atomic=True,
            metadata={META_PREFIX: opts.subject_prefix, META_PARTITIONS: str(opts.partitions)},
        )

    async def position(self, subject: str, *, from_leader: bool = False) -> EntityPosition:
        """The entity's last event on *subject* (0, 0 when it has none).

        A direct get may be answered by any replica; after a fencing conflict, ask the
        stream leader so the next attempt starts from the truth.
        """
        self._require_connection()
        if not from_leader and self._bulk is not None:
            return await self._bulk.position(subject)
        return await self._read_last(subject, direct=not from_leader)

    async def _read_last(self, subject: str, *, direct: bool = True) -> EntityPosition:
        try:
            msg = await self._jsm.get_last_msg(self._options.stream, subject, direct=direct)
        except nats.js.errors.NotFoundError:
            return EntityPosition(0, 0)
        except _NATS_DOWN as error:
            raise Unavailable(
                f"NATS did not answer reading {subject} ({type(error).__name__}); retry later"
            ) from error
        return _position_of(subject, msg.headers or {}, int(msg.seq or 0), msg.data or b"")

    async def append(self, subject: str, event: Event, after: EntityPosition) -> Stored:
        """Publish *event* as the entity's next event, only if *after* is still its last.

        Raises FencingConflict when the broker says the subject moved on.
        """
        self._require_connection()
        headers = _headers(event, after)
        try:
            ack = await self._js.publish(subject, event.payload, headers=headers)
        except nats.js.errors.APIError as error:
            raise _classify_publish_error(error, subject) from error
        except _NATS_DOWN as error:
            raise OutcomeUnknown(
                f"no publish ack from JetStream ({type(error).__name__}); the outcome is "
                "unknown: retry with the same idempotency_key"
            ) from error
        if ack.duplicate:
            return await self._original_of(subject, event, int(ack.seq))
        return Stored(after.sequence + 1, int(ack.seq), subject, duplicate=False)

    async def append_batch(self, appends: Sequence[Append]) -> list[Stored]:
        """Publish every append as one atomic batch (JetStream 2.12+, ``allow_atomic``).

        All but the last message go without a reply subject (the server answers only the
        commit); the commit's ack names the last stream sequence, and a batch is stored
        as one contiguous run, so each append's sequence follows from it. Every append is
        fenced; at most one per subject (a second fenced message of a subject would be
        refused, 10164). Raises BatchRefused (nothing stored) or OutcomeUnknown.
        """
        if not self.atomic:
            raise BatchRefused(f"stream {self._options.stream} takes no atomic batches")
        self._require_connection()
        batch_id = uuid.uuid4().hex
        last = len(appends)
        try:
            for number, item in enumerate(appends[:-1], start=1):
                headers = _headers(item.event, item.after, batch_id, number, fenced=item.fenced)
                await self._nc.publish(item.subject, item.event.payload, headers=headers)
            item = appends[-1]
            headers = _headers(
                item.event, item.after, batch_id, last, commit=True, fenced=item.fenced
            )
            reply = await self._nc.request(
                item.subject, item.event.payload, self._options.publish_timeout, headers=headers
            )
        except _NATS_DOWN as error:
            raise OutcomeUnknown(
                f"no ack for a batch of {last} events ({type(error).__name__}); the outcome "
                "is unknown: retry with the same idempotency_key"
            ) from error
        first = _batch_first_sequence(reply.data, last)
        return [
            Stored(item.after.sequence + 1, first + index, item.subject, duplicate=False)
            for index, item in enumerate(appends)
        ]

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


def _position_of(
    subject: str, headers: dict[str, str], stream_sequence: int, data: bytes
) -> EntityPosition:
    """The position an entity's last message gives (its headers as the sidecar wrote them)."""
    raw = headers.get(contract.HEADER_ENTITY_SEQUENCE, "")
    if not raw.isdigit():
        raise ForeignMessage(
            f"message {stream_sequence} on {subject} has no valid "
            f"{contract.HEADER_ENTITY_SEQUENCE} header: only the sidecar may publish under "
            "its subject prefix"
        )
    raw_version = headers.get(contract.HEADER_ENTITY_VERSION, "")
    return EntityPosition(
        int(raw),
        stream_sequence,
        int(raw_version) if raw_version.isdigit() else None,
        headers.get(contract.HEADER_MSG_ID, ""),
        payload_digest(headers.get(contract.HEADER_ENTITY_OPERATION, ""), data),
    )


def _entity_sequence(msg: RawStreamMsg) -> int:
    raw = (msg.headers or {}).get(contract.HEADER_ENTITY_SEQUENCE, "")
    if not raw.isdigit():
        raise ForeignMessage(
            f"message {msg.seq} on {msg.subject} has no valid {contract.HEADER_ENTITY_SEQUENCE} "
            "header: only the sidecar may publish under its subject prefix"
        )
    return int(raw)


def _classify_publish_error(error: nats.js.errors.APIError, subject: str) -> Exception:
    if error.err_code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT):
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


def _headers(
    event: Event,
    after: EntityPosition,
    batch_id: str = "",
    batch_sequence: int = 0,
    *,
    commit: bool = False,
    fenced: bool = True,
) -> dict[str, str]:
    """The headers of *event* as its entity's next event after *after* (docs/wire-format.md)."""
    headers = {
        **event.headers,
        contract.HEADER_ENTITY_TYPE: event.entity_type,
        contract.HEADER_ENTITY_ID: event.entity_id,
        contract.HEADER_ENTITY_SEQUENCE: str(after.sequence + 1),
        contract.HEADER_ENTITY_OPERATION: event.operation,
        contract.HEADER_MSG_ID: contract.msg_id(
            event.entity_type, event.entity_id, event.idempotency_key
        ),
    }
    if fenced:
        headers[contract.HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE] = str(after.stream_sequence)
    if event.entity_version is not None:
        headers[contract.HEADER_ENTITY_VERSION] = str(event.entity_version)
    if batch_id:
        headers[contract.HEADER_BATCH_ID] = batch_id
        headers[contract.HEADER_BATCH_SEQUENCE] = str(batch_sequence)
        if commit:
            headers[contract.HEADER_BATCH_COMMIT] = "1"
    return headers


def _batch_first_sequence(data: bytes, count: int) -> int:
    """The stream sequence of a committed batch's first message, from the commit's ack."""
    try:
        ack = json.loads(data)
    except ValueError as error:
        raise OutcomeUnknown(f"unreadable batch ack {data[:200]!r}; retry") from error
    problem = ack.get("error")
    if problem:
        code = problem.get("err_code")
        raise BatchRefused(
            f"JetStream refused a batch of {count}: {problem.get('description')} ({code})",
            fenced=code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_IN_FLIGHT),
        )
    if int(ack.get("count", -1)) != count or not ack.get("seq"):
        raise OutcomeUnknown(f"batch ack {ack} does not confirm {count} events; retry")
    return int(ack["seq"]) - count + 1
