"""Small helpers shared by tests: reading a stream, requests, counting messages."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc


@dataclass(frozen=True)
class StoredMessage:
    """One message as it is in the stream."""

    stream_sequence: int
    subject: str
    headers: dict[str, str]
    payload: bytes


async def stream_messages(nc: NatsClient, stream: str) -> list[StoredMessage]:
    """Every message in *stream*, in stream order."""
    jsm = nc.jsm()
    info = await jsm.stream_info(stream)
    if info.state.messages == 0:
        return []
    consumer = await jsm.add_consumer(
        stream, ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0)
    )
    sub = await nc.jetstream().pull_subscribe_bind(consumer.name, stream=stream)
    found: list[StoredMessage] = []
    try:
        while not found or found[-1].stream_sequence < info.state.last_seq:
            try:
                batch = await sub.fetch(500, timeout=2.0)
            except nats.errors.TimeoutError:
                break
            found.extend(
                StoredMessage(m.metadata.sequence.stream, m.subject, dict(m.headers or {}), m.data)
                for m in batch
            )
    finally:
        await sub.unsubscribe()
    return found


async def message_count(nc: NatsClient, stream: str) -> int:
    """How many messages *stream* holds now."""
    info = await nc.jsm().stream_info(stream)
    return int(info.state.messages)


def request(
    entity_id: str = "42",
    *,
    entity_type: str = "patient",
    operation: int = sidecar_pb2.OPERATION_UPDATE,
    payload: bytes = b"{}",
    headers: dict[str, str] | None = None,
    idempotency_key: str = "",
) -> sidecar_pb2.PublishRequest:
    """A PublishRequest with sensible defaults."""
    return sidecar_pb2.PublishRequest(
        entity_type=entity_type,
        entity_id=entity_id,
        operation=operation,  # type: ignore[arg-type]
        payload=payload,
        headers=headers or {},
        idempotency_key=idempotency_key,
    )


async def sidecar_status(target: str) -> sidecar_pb2.SidecarStatus:
    """A running sidecar's GetStatus answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        return await stub.GetStatus(sidecar_pb2.GetStatusRequest(), timeout=5)
