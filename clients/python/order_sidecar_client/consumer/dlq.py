"""The dead-letter stream: where events go after max deliveries, and how they come back.

Dead events are copies at ``{dlq_prefix}.dead.{type}.{partition}.{token}`` with the
original headers (``Nats-*`` ones renamed ``Dlq-Orig-*``) plus the reason. The original
stream stays the source of truth: ``replay`` does not republish the copies (that would
fight the stream's per-subject fencing and duplicate sequences); it publishes a replay
request at ``{dlq_prefix}.replay.{type}.{partition}.{token}``. The worker that holds the
partition unblocks the entity, re-reads its subject from the stream and applies what it
has not applied yet, then purges the entity's dead copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from order_sidecar_client import contract
from order_sidecar_client.consumer.event import (
    HEADER_ENTITY_ID,
    HEADER_ENTITY_TYPE,
    EntityEvent,
    EntityKey,
)

HEADER_REASON = "Dlq-Reason"
HEADER_STREAM = "Dlq-Stream"
HEADER_STREAM_SEQUENCE = "Dlq-Stream-Sequence"
HEADER_SUBJECT = "Dlq-Subject"
HEADER_DELIVERIES = "Dlq-Deliveries"
HEADER_CONSUMER = "Dlq-Consumer"
HEADER_TIME = "Dlq-Time"
ORIGINAL_PREFIX = "Dlq-Orig-"


@dataclass(frozen=True)
class DeadEntry:
    """One dead event as stored in the DLQ stream."""

    dlq_sequence: int
    subject: str
    headers: dict[str, str]
    payload: bytes

    @property
    def key(self) -> EntityKey:
        """The entity."""
        return EntityKey(
            self.headers.get(HEADER_ENTITY_TYPE, ""), self.headers.get(HEADER_ENTITY_ID, "")
        )

    @property
    def entity_path(self) -> str:
        """``{type}.{partition}.{token}``: the tail both dead and replay subjects share."""
        return ".".join(self.subject.split(".")[-3:])


async def ensure_dlq_stream(js: JetStreamContext, stream: str, prefix: str) -> None:
    """Create the DLQ stream if missing (file storage, no limits)."""
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[f"{prefix}.>"],
                storage=StorageType.FILE,
                duplicate_window=120.0,
                description="dead-lettered events of order-sidecar consumers",
            )
        )


class DeadLetters:
    """Publishes dead events and purges them once their entity is re-driven."""

    def __init__(self, js: JetStreamContext, stream: str, dlq_stream: str, prefix: str) -> None:
        self._js = js
        self._stream = stream
        self._dlq_stream = dlq_stream
        self._prefix = prefix

    async def publish(
        self, event: EntityEvent, reason: str, consumer: str, round_: str = ""
    ) -> None:
        """Copy *event* to the DLQ with *reason*; deduplicated per stream sequence and
        *round_* (a replay's own id, so a copy purged by a replay can be written again)."""
        headers = {
            (ORIGINAL_PREFIX + k if k.lower().startswith("nats-") else k): v
            for k, v in event.headers.items()
        }
        headers |= {
            HEADER_REASON: _one_line(reason),
            HEADER_STREAM: self._stream,
            HEADER_STREAM_SEQUENCE: str(event.stream_sequence),
            HEADER_SUBJECT: event.subject,
            HEADER_DELIVERIES: str(event.deliveries),
            HEADER_CONSUMER: consumer,
            HEADER_TIME: f"{time.time():.3f}",
            contract.HEADER_MSG_ID: f"dead:{self._stream}:{event.stream_sequence}:{round_}",
        }
        tail = ".".join(event.subject.split(".")[-3:])
        await self._js.publish(f"{self._prefix}.dead.{tail}", event.payload, headers=headers)

    async def purge(self, entity_tail: str) -> None:
        """Drop the dead copies of one entity (``{type}.{partition}.{token}``)."""
        await self._js.purge_stream(self._dlq_stream, subject=f"{self._prefix}.dead.{entity_tail}")


def _one_line(text: str) -> str:
    # Header values may not hold CR/LF and NATS trims them.
    return " ".join(text.split())[:500] or "unknown"


async def list_dead(nc: NatsClient, dlq_stream: str, prefix: str) -> list[DeadEntry]:
    """Every dead event now in the DLQ, in DLQ order."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(dlq_stream, subjects_filter=f"{prefix}.dead.>")
    except nats.js.errors.NotFoundError:
        return []
    if not info.state.subjects:
        return []
    consumer = await js.add_consumer(
        dlq_stream,
        ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=f"{prefix}.dead.>",
            inactive_threshold=30.0,
        ),
    )
    sub = await js.pull_subscribe_bind(consumer.name, stream=dlq_stream)
    found: list[DeadEntry] = []
    try:
        while True:
            try:
                batch = await sub.fetch(200, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return found
            for msg in batch:
                meta = msg.metadata
                found.append(
                    DeadEntry(meta.sequence.stream, msg.subject, dict(msg.headers or {}), msg.data)
                )
                if meta.num_pending == 0:
                    return found
    finally:
        await sub.unsubscribe()


async def request_replay(js: JetStreamContext, prefix: str, entries: list[DeadEntry]) -> int:
    """Ask the consumers to re-drive each entity of *entries* once; how many entities."""
    tails: dict[str, EntityKey] = {}
    for entry in entries:
        known = tails.get(entry.entity_path)
        if known is None or not (known.entity_type and known.entity_id):
            tails[entry.entity_path] = entry.key  # a malformed copy may lack the entity
    for tail, key in tails.items():
        headers = {HEADER_ENTITY_TYPE: key.entity_type, HEADER_ENTITY_ID: key.entity_id}
        await js.publish(f"{prefix}.replay.{tail}", b"", headers=headers)
    return len(tails)
