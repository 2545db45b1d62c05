"""The suite's baselines: what the broker and gRPC do with no sidecar in the way.

- raw nats-py JetStream publish, awaiting each ack or pipelined (``publish_async``);
- a bare grpc.aio echo server's unary calls (the least a unary RPC costs here);
- a raw pull consumer that fetches in batches and acks each message (the broker's
  consumer floor).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid

import grpc
import nats
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from order_sidecar_tools.bench.processes import ECHO_METHOD
from order_sidecar_tools.bench.runner import BenchRow, make_row

PULL_BATCH = 100
"""Messages per fetch of the raw pull consumer."""


async def raw_publish(
    url: str, events: int, payload: bytes, entities: int, window: int, replicas: int = 1
) -> BenchRow:
    """JetStream publish straight from nats-py: one at a time (window 1) or pipelined,
    to a fresh stream of *replicas* replicas."""
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=max(window, 1))
    prefix = f"raw{uuid.uuid4().hex[:8]}"
    await js.add_stream(
        StreamConfig(name=prefix.upper(), subjects=[f"{prefix}.>"], num_replicas=replicas)
    )
    latencies: list[float] = []
    started = time.perf_counter()
    if window == 1:
        for n in range(events):
            sent = time.perf_counter()
            await js.publish(f"{prefix}.{n % entities}", payload)
            latencies.append(time.perf_counter() - sent)
    else:
        for n in range(events):
            sent = time.perf_counter()
            future = await js.publish_async(f"{prefix}.{n % entities}", payload)
            future.add_done_callback(functools.partial(_record, latencies, sent))
        await js.publish_async_completed()
    seconds = time.perf_counter() - started
    await js.delete_stream(prefix.upper())
    await nc.close()
    mode = (
        "raw publish, await each ack" if window == 1 else f"raw publish_async, {window} in flight"
    )
    return make_row(mode, events, [], seconds, latencies)


async def grpc_floor(target: str, events: int, payload_bytes: int, concurrency: int) -> BenchRow:
    """Unary calls to a bare grpc.aio echo server: the least a unary RPC costs here."""
    body = b"x" * (payload_bytes + 64)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
        remaining = events

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                sent = time.perf_counter()
                await echo(body, timeout=30)
                latencies.append(time.perf_counter() - sent)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return make_row(f"grpc.aio echo, {concurrency} in flight", events, [], seconds, latencies)


async def raw_pull(nc: NatsClient, stream: str, events: int, batch: int = PULL_BATCH) -> BenchRow:
    """Read *events* messages of *stream* with a fresh durable pull consumer: fetch
    *batch* at a time, ack each message; timed from the first message received (as the
    ordered consumer is, from its first apply) to the last ack flushed. Latency: one
    fetch with its acks."""
    js = nc.jetstream()
    durable = f"rawpull{uuid.uuid4().hex[:8]}"
    await js.add_consumer(
        stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT)
    )
    pull = await js.pull_subscribe_bind(durable, stream)
    latencies: list[float] = []
    received = 0
    started = 0.0
    try:
        while received < events:
            fetched = time.perf_counter()
            messages = await pull.fetch(min(batch, events - received), timeout=10)
            started = started or time.perf_counter()
            for message in messages:
                await message.ack()
            received += len(messages)
            latencies.append(time.perf_counter() - fetched)
        await nc.flush()
        seconds = time.perf_counter() - started
    finally:
        await pull.unsubscribe()
        await js.delete_consumer(stream, durable)
    return make_row(f"raw pull fetch+ack, {batch}/fetch", events, [], seconds, latencies)


def _record(latencies: list[float], sent: float, _: object) -> None:
    latencies.append(time.perf_counter() - sent)
