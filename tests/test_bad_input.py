"""Bad input gets a clear status, and nothing lands in the stream."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import message_count, request
from tests.support.servers import NatsServer

INVALID = grpc.StatusCode.INVALID_ARGUMENT

BAD_REQUESTS = {
    "empty type": (request(entity_type=""), "entity_type"),
    "type with a dot": (request(entity_type="pa.tient"), "entity_type"),
    "oversized type": (request(entity_type="t" * 65), "entity_type"),
    "empty id": (request(""), "entity_id"),
    "oversized id": (request("x" * 257), "entity_id"),
    "id with newline": (request("a\nb"), "control characters"),
    "id with leading space": (request(" 42"), "whitespace"),
    "unspecified operation": (request(operation=0), "operation"),
    "unknown operation": (request(operation=99), "operation"),
    "reserved Nats header": (request(headers={"Nats-Msg-Id": "x"}), "reserved"),
    "reserved Entity header": (request(headers={"entity-sequence": "9"}), "reserved"),
    "header name with colon": (request(headers={"a:b": "x"}), "header name"),
    "header value with CRLF": (request(headers={"X-A": "1\r\nX-B: 2"}), "CR or LF"),
    "idempotency key with space": (request(idempotency_key="a b"), "idempotency_key"),
    "oversized idempotency key": (request(idempotency_key="k" * 129), "idempotency_key"),
    "payload over max_payload": (request(payload=b"x" * (1024 * 1024)), "too large"),
}


@pytest.fixture
async def stub(app: SidecarApp) -> AsyncIterator[sidecar_pb2_grpc.SidecarAsyncStub]:
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(app.target, options=options) as channel:
        yield sidecar_pb2_grpc.SidecarStub(channel)


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_request_is_invalid_argument_and_publishes_nothing(
    case: str, stub: sidecar_pb2_grpc.SidecarAsyncStub, nc: NatsClient, serve_config: ServeConfig
) -> None:
    bad, hint = BAD_REQUESTS[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Publish(bad)
    assert caught.value.code() == INVALID
    assert hint in (caught.value.details() or "")
    reply = await stub.PublishBatch(sidecar_pb2.PublishBatchRequest(events=[bad, request("fine")]))
    assert [r.code for r in reply.results] == [INVALID.value[0], 0]
    assert hint in reply.results[0].message
    assert await message_count(nc, serve_config.stream) == 1


async def test_batch_over_the_limit_is_refused_whole(
    serve_config: ServeConfig, nc: NatsClient
) -> None:
    app = SidecarApp(dataclasses.replace(serve_config, max_batch=3))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as channel:
            stub: sidecar_pb2_grpc.SidecarAsyncStub = sidecar_pb2_grpc.SidecarStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.PublishBatch(
                    sidecar_pb2.PublishBatchRequest(events=[request(str(n)) for n in range(4)])
                )
        assert caught.value.code() == INVALID
        assert "--max-batch" in (caught.value.details() or "")
        assert await message_count(nc, serve_config.stream) == 0
    finally:
        await app.stop()


async def test_nats_down_is_unavailable(serve_config: ServeConfig, tmp_path: object) -> None:
    from pathlib import Path

    nats_server = NatsServer(Path(str(tmp_path)))
    nats_server.start()
    config = dataclasses.replace(serve_config, nats_url=nats_server.url, publish_timeout=1.0)
    app = SidecarApp(config)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as channel:
            stub: sidecar_pb2_grpc.SidecarAsyncStub = sidecar_pb2_grpc.SidecarStub(channel)
            assert (await stub.Publish(request("n1"))).sequence == 1
            nats_server.kill()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Publish(request("n1", idempotency_key="after-kill"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "retry" in (caught.value.details() or "")
            nats_server.start()
            again = await _publish_when_back(stub, request("n1", idempotency_key="after-kill"))
            assert again.sequence == 2
    finally:
        await app.stop()
        nats_server.kill()


async def _publish_when_back(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, req: sidecar_pb2.PublishRequest
) -> sidecar_pb2.PublishResponse:
    import asyncio

    for _ in range(100):
        try:
            return await stub.Publish(req, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.1)
    raise TimeoutError("NATS did not come back within 100 tries")


@pytest.mark.parametrize("policy", ["fence", "reject"])
async def test_redis_down(policy: str, serve_config: ServeConfig, nc: NatsClient) -> None:
    """Documented choice: 'fence' (default) publishes on, order kept by the broker;
    'reject' answers UNAVAILABLE and publishes nothing."""
    dead_redis = "redis://127.0.0.1:1/0"
    config = dataclasses.replace(serve_config, redis_url=(dead_redis,), on_lock_unavailable=policy)
    app = SidecarApp(config)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as channel:
            stub: sidecar_pb2_grpc.SidecarAsyncStub = sidecar_pb2_grpc.SidecarStub(channel)
            if policy == "fence":
                replies = [await stub.Publish(request("r")) for _ in range(3)]
                assert [r.sequence for r in replies] == [1, 2, 3]
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Publish(request("r"))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "redis" in (caught.value.details() or "").lower()
                assert await message_count(nc, serve_config.stream) == 0
    finally:
        await app.stop()
