"""PublishStream: per-entity order at full speed, back-pressure, failures block the entity."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.jetstream.verify import OrderChecker
from order_sidecar.runtime.app import SidecarApp
from order_sidecar_client import AsyncSidecarClient, Event, Published, SidecarClient, SidecarError

from tests.support.helpers import stream_messages
from tests.support.load import sidecar_options
from tests.support.servers import NatsServer, RedisServer, SidecarProcess


async def test_stream_keeps_each_entitys_arrival_order(app: SidecarApp, nc: NatsClient) -> None:
    events = [Event("order", f"s{n % 20}", "update", b"%d" % n) for n in range(2000)]
    async with AsyncSidecarClient(app.target) as client:
        results = [pair async for pair in client.publish_stream(events)]
    assert len(results) == 2000
    assert all(isinstance(result, Published) for _, result in results)
    # The sequence numbers follow the order the events were sent in, per entity.
    sequence_of = {id(event): result.sequence for event, result in results}  # type: ignore[union-attr]
    for entity in range(20):
        sent = [sequence_of[id(e)] for e in events if e.entity_id == f"s{entity}"]
        assert sent == list(range(1, 101))
    checker = OrderChecker()
    stored = await stream_messages(nc, app.config.stream)
    for message in stored:
        checker.observe(message.headers)
    assert checker.report()["order"].violations == 0
    payloads = {m.headers["Entity-Id"]: [] for m in stored}  # type: ignore[var-annotated]
    for message in stored:
        payloads[message.headers["Entity-Id"]].append(int(message.payload))
    assert all(values == sorted(values) for values in payloads.values())


async def test_a_failure_blocks_the_entitys_later_events_on_the_stream(
    app: SidecarApp, nc: NatsClient
) -> None:
    async with AsyncSidecarClient(app.target) as client:
        await client.publish(Event("order", "z", "create", entity_version=9))
        streamed = [
            pair
            async for pair in client.publish_stream(
                [
                    Event("order", "x", "create", b"x1"),
                    Event("order", "x", "update", b"x2", headers={"Nats-Foo": "bad"}),
                    Event("order", "x", "update", b"x3"),
                    Event("order", "z", "update", b"z-stale", entity_version=3),
                    Event("order", "z", "update", b"z-after", entity_version=10),
                    Event("order", "w", "create", b"w1"),
                ]
            )
        ]
    codes = {
        event.payload: (r.code if isinstance(r, SidecarError) else grpc.StatusCode.OK)
        for event, r in streamed
    }
    assert codes == {
        b"x1": grpc.StatusCode.OK,
        b"x2": grpc.StatusCode.INVALID_ARGUMENT,
        b"x3": grpc.StatusCode.FAILED_PRECONDITION,
        b"z-stale": grpc.StatusCode.FAILED_PRECONDITION,
        b"z-after": grpc.StatusCode.FAILED_PRECONDITION,
        b"w1": grpc.StatusCode.OK,
    }
    after = next(r for e, r in streamed if e.payload == b"z-after")
    assert isinstance(after, SidecarError)
    assert "event 4 of this entity on this stream failed" in after.message
    stored = await stream_messages(nc, app.config.stream)
    assert sorted(m.payload for m in stored) == [b"", b"w1", b"x1"]


def test_sync_client_streams(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecars("stream", **sidecar_options(nats_server, redis_server, names))
    events = [Event("order", f"t{n % 3}", "update") for n in range(300)]
    with SidecarClient(sidecar.target) as client:
        results = list(client.publish_stream(iter(events)))
    assert len(results) == 300
    assert sorted(r.sequence for _, r in results if isinstance(r, Published)) == sorted(
        [n // 3 + 1 for n in range(300)]
    )


async def test_an_error_in_the_callers_events_reaches_the_caller(app: SidecarApp) -> None:
    def events() -> Iterator[Event]:
        yield Event("order", "g1", "create")
        raise RuntimeError("the caller's generator broke")

    async with AsyncSidecarClient(app.target) as client:
        with pytest.raises(RuntimeError, match="generator broke"):
            async for _ in client.publish_stream(events()):
                pass
