"""Health, reflection, graceful shutdown and stream provisioning."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig
from order_sidecar.core.errors import ConfigError
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import AsyncSidecarClient, Event, SidecarError
from redis.asyncio import Redis

from tests.support.helpers import message_count
from tests.support.load import sidecar_options, wait_for_messages
from tests.support.servers import NatsServer, RedisServer, SidecarProcess


async def test_health_and_reflection(app: SidecarApp) -> None:
    async with grpc.aio.insecure_channel(app.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ordersidecar.v1.Sidecar"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflection.ServerReflectionInfo(iter([request])):
            listed = {s.name for s in response.list_services_response.service}
            assert {"ordersidecar.v1.Sidecar", "grpc.health.v1.Health"} <= listed
            break


async def test_sigterm_finishes_in_flight_work_releases_locks_and_exits_0(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
) -> None:
    sidecar = sidecars("graceful", **sidecar_options(nats_server, redis_server, names))
    async with AsyncSidecarClient(sidecar.target) as client:
        in_flight = [
            asyncio.ensure_future(client.publish(Event("order", f"g{n % 5}", "update")))
            for n in range(1000)
        ]
        await wait_for_messages(nc, names["stream"], 50, timeout=60)
        stored_at_signal = await message_count(nc, names["stream"])
        status = await asyncio.get_running_loop().run_in_executor(None, sidecar.terminate)
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    assert status == 0, sidecar.log_tail()
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(done) > stored_at_signal, "requests in flight at SIGTERM were dropped"
    assert all(isinstance(o, SidecarError) and o.retryable for o in failed), failed[:3]
    assert len(done) == await message_count(nc, names["stream"])
    redis = Redis.from_url(redis_server.url)
    try:
        assert not await redis.keys(f"redlock:ordersidecar:{names['stream']}:*")
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"partitions": 8}, "ordersidecar.partitions=16"),
        ({"duplicate_window": 60.0}, "duplicate_window"),
    ],
)
async def test_existing_stream_that_does_not_fit_is_a_startup_error(
    serve_config: ServeConfig, change: dict[str, object], complaint: str
) -> None:
    first = SidecarApp(serve_config)
    await first.start()
    await first.stop()
    with pytest.raises(ConfigError, match=complaint) as caught:
        await SidecarApp(dataclasses.replace(serve_config, **change)).start()  # type: ignore[arg-type]
    assert "Use another --stream" in str(caught.value)


async def test_memory_stream_is_refused(serve_config: ServeConfig, nc: NatsClient) -> None:
    await nc.jsm().add_stream(
        StreamConfig(
            name=serve_config.stream,
            subjects=[f"{serve_config.subject_prefix}.>"],
            storage=StorageType.MEMORY,
            allow_direct=True,
            duplicate_window=serve_config.duplicate_window,
        )
    )
    with pytest.raises(ConfigError, match="storage"):
        await SidecarApp(serve_config).start()


async def test_sidecars_starting_together_share_one_stream(
    serve_config: ServeConfig, nc: NatsClient
) -> None:
    apps = [SidecarApp(serve_config) for _ in range(3)]
    await asyncio.gather(*(a.start() for a in apps))
    try:
        info = await nc.jsm().stream_info(serve_config.stream)
        assert info.config.storage == StorageType.FILE
        assert info.config.allow_direct
    finally:
        await asyncio.gather(*(a.stop() for a in apps))
