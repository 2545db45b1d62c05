"""Ordered publish through one in-process sidecar on real NATS and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.core.errors import FencingConflict
from order_sidecar.core.model import EntityPosition, Event
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import contract
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from redis.asyncio import Redis

from tests.support.helpers import message_count, request, stream_messages
from tests.support.servers import RedisServer, wait_until


@pytest.fixture
async def stub(app: SidecarApp) -> AsyncIterator[sidecar_pb2_grpc.SidecarAsyncStub]:
    async with grpc.aio.insecure_channel(app.target) as channel:
        yield sidecar_pb2_grpc.SidecarStub(channel)


async def test_sequences_headers_and_subject_follow_the_wire_format(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, nc: NatsClient, serve_config: ServeConfig
) -> None:
    replies = [
        await stub.Publish(request("a.b c", payload=b"%d" % n, headers={"X-Trace": f"t{n}"}))
        for n in range(5)
    ]
    assert [r.sequence for r in replies] == [1, 2, 3, 4, 5]
    assert not any(r.duplicate for r in replies)
    subject = contract.subject_for(serve_config.subject_prefix, "patient", "a.b c", 16)
    assert {r.subject for r in replies} == {subject}
    stored = await stream_messages(nc, serve_config.stream)
    assert [m.stream_sequence for m in stored] == [r.stream_sequence for r in replies]
    first = stored[0]
    assert first.subject == subject
    assert first.payload == b"0"
    assert first.headers["Entity-Type"] == "patient"
    assert first.headers["Entity-Id"] == "a.b c"
    assert first.headers["Entity-Sequence"] == "1"
    assert first.headers["Entity-Operation"] == "update"
    assert first.headers["X-Trace"] == "t0"
    assert first.headers["Nats-Msg-Id"].startswith("patient:")


async def test_entities_have_their_own_sequences(stub: sidecar_pb2_grpc.SidecarAsyncStub) -> None:
    ids = ["1", "2", "日本", "1.5", "*", ">"]
    replies = await asyncio.gather(*(stub.Publish(request(i)) for i in ids * 3))
    by_entity: dict[str, list[int]] = {}
    for entity_id, reply in zip(ids * 3, replies, strict=True):
        by_entity.setdefault(entity_id, []).append(reply.sequence)
    assert {k: sorted(v) for k, v in by_entity.items()} == {i: [1, 2, 3] for i in ids}
    assert len({r.subject for r in replies}) == len(ids)


async def test_retry_with_same_key_returns_first_result(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, nc: NatsClient, serve_config: ServeConfig
) -> None:
    first = await stub.Publish(request("7", idempotency_key="k-1"))
    await stub.Publish(request("7", idempotency_key="k-2"))
    again = await stub.Publish(request("7", idempotency_key="k-1"))
    assert again.duplicate
    assert (again.sequence, again.stream_sequence) == (first.sequence, first.stream_sequence)
    assert await message_count(nc, serve_config.stream) == 2
    # Keys are scoped per entity: the same key on another entity is a new event.
    other = await stub.Publish(request("8", idempotency_key="k-1"))
    assert not other.duplicate and other.sequence == 1


async def test_key_reused_for_a_different_event_is_refused(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, nc: NatsClient, serve_config: ServeConfig
) -> None:
    await stub.Publish(request("9", payload=b"one", idempotency_key="k"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Publish(request("9", payload=b"two", idempotency_key="k"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already used" in (caught.value.details() or "")
    assert await message_count(nc, serve_config.stream) == 1


async def test_batch_keeps_each_entitys_order(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, nc: NatsClient, serve_config: ServeConfig
) -> None:
    events = [request(f"e{n % 4}", payload=b"%d" % n) for n in range(40)]
    reply = await stub.PublishBatch(sidecar_pb2.PublishBatchRequest(events=events))
    assert [r.code for r in reply.results] == [0] * 40
    for n, result in enumerate(reply.results):
        assert result.response.sequence == n // 4 + 1
    stored = await stream_messages(nc, serve_config.stream)
    for entity in range(4):
        payloads = [m.payload for m in stored if m.headers["Entity-Id"] == f"e{entity}"]
        assert payloads == [b"%d" % n for n in range(entity, 40, 4)]


async def test_batch_with_invalid_event_publishes_none_of_that_entity(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, nc: NatsClient, serve_config: ServeConfig
) -> None:
    events = [
        request("a"),
        request("b"),
        request("a", headers={"Nats-Msg-Id": "x"}),
        request("a"),
        request("c"),
    ]
    reply = await stub.PublishBatch(sidecar_pb2.PublishBatchRequest(events=events))
    codes = [grpc.StatusCode.OK.value[0]] * 5
    # Not retryable: a client must not resend them without the invalid one.
    codes[0] = codes[3] = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    codes[2] = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.code for r in reply.results] == codes
    assert "#2" in reply.results[0].message
    stored = await stream_messages(nc, serve_config.stream)
    assert sorted(m.headers["Entity-Id"] for m in stored) == ["b", "c"]


async def test_broker_refuses_a_stale_append(app: SidecarApp, nc: NatsClient) -> None:
    """G4 at its root: an append whose expected position is stale never lands."""
    assert app.publisher is not None
    stream = app.publisher.stream
    event = Event("patient", "fenced", "update", b"x", {}, "k1")
    subject = stream.subject_for(event)
    first = await stream.append(subject, event, EntityPosition(0, 0))
    await stream.append(subject, dataclasses.replace(event, idempotency_key="k2"), _after(first))
    with pytest.raises(FencingConflict):
        stale = _after(first)
        await stream.append(subject, dataclasses.replace(event, idempotency_key="k3"), stale)
    assert await message_count(nc, app.config.stream) == 2


async def test_sidecar_that_lost_its_lock_is_fenced_then_recovers(
    serve_config: ServeConfig, nc: NatsClient, redis_server: RedisServer
) -> None:
    """G4: A holds the lock and a cached position, 'pauses' past the TTL, B publishes;
    A's next publish is refused by the broker, re-read, and lands after B's events."""
    first, second = SidecarApp(serve_config), SidecarApp(serve_config)
    await first.start()
    await second.start()
    try:
        assert first.publisher is not None and second.publisher is not None
        event = Event("patient", "contended", "update", b"a", {}, "a1")
        await first.publisher.publish(event)
        key = first.publisher.lock_key(event)
        redis = Redis.from_url(redis_server.url)
        async with first.publisher._gates.hold(key) as gate:
            await first.publisher._gates.ensure_lease(gate, None)
            gate.position = EntityPosition(1, 1)
            assert gate.renewer is not None
            gate.renewer.cancel()  # the pause: no more renewals
            lock_key = f"redlock:ordersidecar:{key}"
            await _until_gone(redis, lock_key, serve_config.lock_ttl * 3)
            for n in range(2):
                await second.publisher.publish(
                    dataclasses.replace(event, payload=b"b", idempotency_key=f"b{n}")
                )
            stored = await first.publisher._publish_held(
                gate, dataclasses.replace(event, payload=b"late", idempotency_key="a2"), None
            )
        await redis.aclose()
        assert first.publisher.stats.fenced == 1
        fenced = first.metrics.registry.get_sample_value("ordersidecar_fencing_rejections_total")
        assert fenced == 1
        assert stored.sequence == 4
        messages = await stream_messages(nc, serve_config.stream)
        assert [m.headers["Entity-Sequence"] for m in messages] == ["1", "2", "3", "4"]
        assert [m.payload for m in messages] == [b"a", b"b", b"b", b"late"]
    finally:
        await first.stop()
        await second.stop()


async def test_sequences_survive_redis_losing_its_data(
    serve_config: ServeConfig, nc: NatsClient, tmp_path: Path
) -> None:
    """G5: the stream, not Redis, holds the sequence; a Redis restart changes nothing."""
    redis = RedisServer(tmp_path)
    redis.start()
    config = dataclasses.replace(serve_config, redis_url=(redis.url,))
    app = SidecarApp(config)
    await app.start()
    try:
        assert app.publisher is not None
        for n in range(3):
            await app.publisher.publish(Event("patient", "g5", "update", b"", {}, f"k{n}"))
        redis.restart()
        after = await app.publisher.publish(Event("patient", "g5", "update", b"", {}, "k3"))
        assert after.sequence == 4
    finally:
        await app.stop()
        redis.kill()


def _after(stored: object) -> EntityPosition:
    return EntityPosition(stored.sequence, stored.stream_sequence)  # type: ignore[attr-defined]


async def _until_gone(redis: Redis, key: str, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await redis.exists(key):
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"lock {key} did not expire within {timeout}s")
        await asyncio.sleep(0.05)


def test_wait_until_reports_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match="the moon"):
        wait_until(lambda: False, 0.05, "the moon")


async def test_one_sidecar_never_contends_with_itself(serve_config: ServeConfig) -> None:
    """Concurrent requests for one entity queue in the sidecar: one lock acquire for all."""
    app = SidecarApp(serve_config)
    await app.start()
    try:
        assert app.publisher is not None
        gates = app.publisher._gates
        backend = gates._backend
        acquires = 0
        real_acquire = backend.acquire

        async def counting_acquire(key: str, ttl: float, wait: float) -> object:
            nonlocal acquires
            acquires += 1
            return await real_acquire(key, ttl, wait)

        backend.acquire = counting_acquire  # type: ignore[method-assign,assignment]
        events = [Event("patient", "hot", "update", b"%d" % n, {}, f"h{n}") for n in range(50)]
        stored = await asyncio.gather(*(app.publisher.publish(e) for e in events))
        assert sorted(s.sequence for s in stored) == list(range(1, 51))
        assert [s.sequence for s in stored] == list(range(1, 51)), "FIFO per entity"
        assert acquires == 1
        assert app.publisher.stats.fenced == 0
    finally:
        await app.stop()


async def test_cancelled_waiter_does_not_leave_the_lock_held(
    serve_config: ServeConfig, redis_server: RedisServer
) -> None:
    """The holder hands the gate to a waiter, which is cancelled before it runs: the
    entity's lock must be released, not renewed forever by a gate nobody can reach."""
    app = SidecarApp(serve_config)
    await app.start()
    redis = Redis.from_url(redis_server.url)
    try:
        assert app.publisher is not None
        gates = app.publisher._gates
        key = app.publisher.lock_key(Event("patient", "orphan", "update", b""))
        entered = asyncio.Event()

        async def waiter() -> None:
            async with gates.hold(key):
                entered.set()

        async with gates.hold(key) as gate:
            await gates.ensure_lease(gate, None)
            queued = asyncio.ensure_future(waiter())
            await _until(lambda: gate.users == 2, 5.0)
        queued.cancel()  # before it gets to run with the gate handed over
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        assert not entered.is_set()
        assert gates.busy_entities == 0
        # The lock lingers for the entity's next event, then is let go (not renewed on).
        deadline = serve_config.lock_linger + 5
        await _until(lambda: gates.lingering == 0, deadline)
        assert not await redis.exists(f"redlock:ordersidecar:{key}")
    finally:
        await redis.aclose()
        await app.stop()


async def _until(condition: Callable[[], bool], within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)
