"""Limits with clear errors: request size (--max-message-bytes), an event over the NATS
server's max_payload, and concurrent PublishStream calls (--max-streams).
(--max-batch: tests/test_bad_input.py::test_batch_over_the_limit_is_refused_whole.)"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import message_count, request


@pytest.fixture
async def small_app(serve_config: ServeConfig) -> AsyncIterator[SidecarApp]:
    """A sidecar taking 64 KiB requests and 2 concurrent streams."""
    config = dataclasses.replace(serve_config, max_message_bytes=64 * 1024, max_streams=2)
    sidecar = SidecarApp(config)
    await sidecar.start()
    yield sidecar
    await sidecar.stop()


async def test_request_over_max_message_bytes(small_app: SidecarApp, nc: NatsClient) -> None:
    async with grpc.aio.insecure_channel(small_app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Publish(request("big", payload=b"x" * 100_000), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (refused.value.details() or "")
        reply = await stub.Publish(request("small", payload=b"x" * 1000), timeout=10)
        assert reply.sequence == 1
    assert await message_count(nc, small_app.config.stream) == 1


async def test_event_over_nats_max_payload_publishes_nothing_of_its_entity(
    app: SidecarApp, nc: NatsClient
) -> None:
    too_big = b"x" * (2 * 1024 * 1024)  # under gRPC's 4 MiB, over nats-server's 1 MiB
    batch = sidecar_pb2.PublishBatchRequest(
        events=[
            request("e", operation=sidecar_pb2.OPERATION_CREATE),
            request("e", payload=too_big),
            request("e"),
            request("other"),
        ]
    )
    async with grpc.aio.insecure_channel(app.target) as channel:
        reply = await sidecar_pb2_grpc.SidecarStub(channel).PublishBatch(batch, timeout=10)
    codes = [grpc.StatusCode.OK.value[0] if r.code == 0 else r.code for r in reply.results]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes[0] == 0 and codes[3] == 0  # before it, and another entity: published
    assert codes[1] == invalid and "too large" in reply.results[1].message
    assert codes[2] != 0 and "event" in reply.results[2].message  # after it: not published
    assert await message_count(nc, app.config.stream) == 2


async def test_streams_over_max_streams_are_refused(small_app: SidecarApp) -> None:
    async with grpc.aio.insecure_channel(small_app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        feeds = [asyncio.Queue[sidecar_pb2.PublishStreamRequest | None]() for _ in range(3)]
        calls = []
        for number in (0, 1):  # two streams open, one after the other: each answered an event
            calls.append(stub.PublishStream(_drain(feeds[number])))
            feeds[number].put_nowait(_tagged(f"open-{number}"))
            reply = await asyncio.wait_for(calls[number].read(), 10)
            assert isinstance(reply, sidecar_pb2.PublishStreamResponse) and reply.result.code == 0
        calls.append(stub.PublishStream(_drain(feeds[2])))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(calls[2].read(), 10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in (refused.value.details() or "")
        feeds[0].put_nowait(None)  # one stream ends: a new one is taken again
        assert await asyncio.wait_for(calls[0].code(), 10) == grpc.StatusCode.OK
        later = asyncio.Queue[sidecar_pb2.PublishStreamRequest | None]()
        later.put_nowait(_tagged("later"))
        later.put_nowait(None)
        replies = [reply async for reply in stub.PublishStream(_drain(later))]
        assert [reply.result.code for reply in replies] == [0]
        feeds[1].put_nowait(None)
        assert await asyncio.wait_for(calls[1].code(), 10) == grpc.StatusCode.OK


def _tagged(entity_id: str) -> sidecar_pb2.PublishStreamRequest:
    return sidecar_pb2.PublishStreamRequest(tag=entity_id, event=request(entity_id))


async def _drain(
    feed: asyncio.Queue[sidecar_pb2.PublishStreamRequest | None],
) -> AsyncIterator[sidecar_pb2.PublishStreamRequest]:
    while (item := await feed.get()) is not None:
        yield item
