"""Caller-held leases and optimistic concurrency, on real NATS and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import AsyncSidecarClient, Event, RetryPolicy, SidecarError
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import message_count, stream_messages

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
QUICK = RetryPolicy(attempts=1, attempt_timeout=10.0)


@pytest.fixture
async def pair(serve_config: ServeConfig) -> AsyncIterator[tuple[SidecarApp, SidecarApp]]:
    """Two sidecars on the same stream and Redis, as two producer replicas would have."""
    apps = (SidecarApp(serve_config), SidecarApp(serve_config))
    for app in apps:
        await app.start()
    yield apps
    for app in apps:
        await app.stop()


async def test_publish_under_a_lease_continues_from_its_fencing_token(app: SidecarApp) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        await client.publish(Event("patient", "p1", "create"))
        async with client.lease("patient", "p1", ttl=5) as lease:
            assert lease.fencing_token == 1
            first = await lease.publish(Event("patient", "p1", "update", entity_version=1))
            second = await lease.publish(Event("patient", "p1", "update", entity_version=2))
        assert (first.sequence, second.sequence) == (2, 3)
        after = await client.publish(Event("patient", "p1", "delete"))
        assert after.sequence == 4


async def test_a_held_lease_keeps_other_sidecars_out_until_released(
    pair: tuple[SidecarApp, SidecarApp],
) -> None:
    holder_app, other_app = pair
    async with (
        AsyncSidecarClient(holder_app.target, retry=QUICK) as holder,
        AsyncSidecarClient(other_app.target, retry=QUICK) as other,
    ):
        async with holder.lease("patient", "p2", ttl=5) as lease:
            with pytest.raises(SidecarError) as caught:
                async with other.lease("patient", "p2", wait=0.3):
                    pass
            assert caught.value.code == grpc.StatusCode.ABORTED
            waiting = asyncio.ensure_future(other.publish(Event("patient", "p2", "update")))
            await lease.publish(Event("patient", "p2", "create"))
            assert not waiting.done()
        assert (await waiting).sequence == 2


async def test_acquire_wait_is_bounded_by_the_call_deadline(
    pair: tuple[SidecarApp, SidecarApp],
) -> None:
    holder_app, other_app = pair
    async with (
        AsyncSidecarClient(holder_app.target, retry=QUICK) as holder,
        grpc.aio.insecure_channel(other_app.target) as channel,
    ):
        stub: sidecar_pb2_grpc.SidecarAsyncStub = sidecar_pb2_grpc.SidecarStub(channel)
        async with holder.lease("patient", "p3", ttl=5):
            request = sidecar_pb2.AcquireLeaseRequest(entity_type="patient", entity_id="p3")
            request.wait_timeout.FromSeconds(30)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.AcquireLease(request, timeout=1.0)
            assert caught.value.code() == grpc.StatusCode.ABORTED
            assert time.monotonic() - started < 2.0


async def test_expected_sequence(app: SidecarApp, nc: NatsClient) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        first = await client.publish(Event("order", "o1", "create", expected_sequence=0))
        with pytest.raises(SidecarError) as caught:
            await client.publish(Event("order", "o1", "update", expected_sequence=0))
        assert caught.value.code == FAILED_PRECONDITION
        assert "last sequence is 1, expected 0" in caught.value.message
        second = await client.publish(Event("order", "o1", "update", expected_sequence=1))
    assert (first.sequence, second.sequence) == (1, 2)
    assert await message_count(nc, app.config.stream) == 2


async def test_retry_of_the_last_event_is_a_duplicate_not_a_conflict(app: SidecarApp) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        event = Event("order", "o2", "create", expected_sequence=0, entity_version=7)
        first = await client.publish(event)
        again = await client.publish(event)
    assert again.duplicate
    assert (again.sequence, again.stream_sequence) == (first.sequence, first.stream_sequence)


async def test_stale_entity_version_is_refused_and_never_published(
    app: SidecarApp, nc: NatsClient
) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        await client.publish(Event("order", "o3", "create", entity_version=5))
        for stale in (5, 4):
            with pytest.raises(SidecarError) as caught:
                await client.publish(Event("order", "o3", "update", entity_version=stale))
            assert caught.value.code == FAILED_PRECONDITION
            assert f"entity_version {stale} is stale" in caught.value.message
            assert "last published version is 5" in caught.value.message
        newer = await client.publish(Event("order", "o3", "update", entity_version=6))
    assert newer.sequence == 2
    stored = await stream_messages(nc, app.config.stream)
    assert [m.headers["Entity-Version"] for m in stored] == ["5", "6"]


async def test_stale_version_is_judged_on_fresh_data_across_sidecars(
    pair: tuple[SidecarApp, SidecarApp],
) -> None:
    first_app, second_app = pair
    async with (
        AsyncSidecarClient(first_app.target, retry=QUICK) as first,
        AsyncSidecarClient(second_app.target, retry=QUICK) as second,
    ):
        await first.publish(Event("order", "o4", "create", entity_version=1))
        await second.publish(Event("order", "o4", "update", entity_version=2))
        with pytest.raises(SidecarError, match="last published version is 2"):
            await first.publish(Event("order", "o4", "update", entity_version=2))
        assert (await first.publish(Event("order", "o4", "update", entity_version=3))).sequence == 3


async def test_release_by_a_non_holder(pair: tuple[SidecarApp, SidecarApp]) -> None:
    holder_app, other_app = pair
    async with (
        AsyncSidecarClient(holder_app.target, retry=QUICK) as holder,
        AsyncSidecarClient(other_app.target, retry=QUICK) as other,
        holder.lease("patient", "p4", ttl=5) as lease,
    ):
        with pytest.raises(SidecarError) as caught:
            await other._release(lease.info.lease_id)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(SidecarError) as unknown:
            await holder._release("not-a-lease")
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(SidecarError) as foreign:
            await other._publish_request(
                Event("patient", "p4", "update").to_request(lease.info.lease_id)
            )
        assert foreign.value.code == FAILED_PRECONDITION
        assert "unknown to this sidecar" in foreign.value.message
        # The holder's lock is untouched.
        with pytest.raises(SidecarError, match="ABORTED"):
            async with other.lease("patient", "p4", wait=0.2):
                pass
        assert (await lease.publish(Event("patient", "p4", "create"))).sequence == 1


async def test_expired_lease_cannot_renew_or_publish(
    serve_config: ServeConfig, nc: NatsClient
) -> None:
    app = SidecarApp(serve_config)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as channel:
            stub: sidecar_pb2_grpc.SidecarAsyncStub = sidecar_pb2_grpc.SidecarStub(channel)
            request = sidecar_pb2.AcquireLeaseRequest(entity_type="patient", entity_id="p5")
            request.ttl.FromMilliseconds(500)
            lease = await stub.AcquireLease(request)
            await _until(lambda: time.time() > lease.expires_at.ToNanoseconds() / 1e9, 5.0)
            with pytest.raises(grpc.aio.AioRpcError) as renew:
                await stub.RenewLease(sidecar_pb2.RenewLeaseRequest(lease_id=lease.lease_id))
            assert renew.value.code() == FAILED_PRECONDITION
            publish = Event("patient", "p5", "create").to_request(lease.lease_id)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Publish(publish)
            assert late.value.code() == FAILED_PRECONDITION
            assert "redo the transaction" in (late.value.details() or "")
        assert await message_count(nc, serve_config.stream) == 0
    finally:
        await app.stop()


async def test_lease_lost_to_another_holder_is_refused_by_the_broker(
    pair: tuple[SidecarApp, SidecarApp], nc: NatsClient
) -> None:
    """Even if the holder's own clock says the lease is alive, the broker fences it."""
    first_app, second_app = pair
    assert first_app.publisher is not None
    async with (
        AsyncSidecarClient(first_app.target, retry=QUICK) as first,
        AsyncSidecarClient(second_app.target, retry=QUICK) as second,
        first.lease("patient", "p6", ttl=5) as lease,
    ):
        held = first_app.publisher.leases.get(lease.info.lease_id)
        await first_app.publisher.leases._backend.release(held.lock)  # lock stolen
        await second.publish(Event("patient", "p6", "create"))
        with pytest.raises(SidecarError) as caught:
            await lease.publish(Event("patient", "p6", "update"))
        assert caught.value.code == FAILED_PRECONDITION
        assert "was lost" in caught.value.message
    stored = await stream_messages(nc, first_app.config.stream)
    assert [m.headers["Entity-Sequence"] for m in stored] == ["1"]


async def test_lease_ttl_and_wait_are_checked(app: SidecarApp) -> None:
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub: sidecar_pb2_grpc.SidecarAsyncStub = sidecar_pb2_grpc.SidecarStub(channel)
        for change in ({"ttl_ms": 10}, {"entity_type": "bad type"}, {"entity_id": ""}):
            request = sidecar_pb2.AcquireLeaseRequest(
                entity_type=str(change.get("entity_type", "patient")),
                entity_id=str(change.get("entity_id", "x")),
            )
            request.ttl.FromMilliseconds(int(change.get("ttl_ms", 1000)))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.AcquireLease(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _until(condition: object, within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def test_dataclass_replace_keeps_event_options() -> None:
    event = Event("order", "1", "update", entity_version=3, expected_sequence=2)
    request = dataclasses.replace(event, payload=b"x").to_request("lease-1")
    assert (request.entity_version, request.expected_sequence, request.lease_id) == (
        3,
        2,
        "lease-1",
    )


async def test_background_renewal_keeps_a_lease_past_its_ttl(app: SidecarApp) -> None:
    async with (
        AsyncSidecarClient(app.target, retry=QUICK) as client,
        client.lease("patient", "p7", ttl=1.0) as lease,
    ):
        first_expiry = lease.info.expires_at.timestamp()
        await _until(lambda: time.time() > first_expiry + 1.0, 5.0)
        assert lease.renewal_error is None
        assert lease.info.expires_at.timestamp() > first_expiry
        assert (await lease.publish(Event("patient", "p7", "create"))).sequence == 1


async def test_batch_under_a_lease(app: SidecarApp) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        await client.publish(Event("patient", "p8", "create"))
        async with client.lease("patient", "p8", ttl=5) as lease:
            request = sidecar_pb2.PublishBatchRequest(
                events=[
                    Event("patient", "p8", "update").to_request(lease.info.lease_id)
                    for _ in range(3)
                ]
            )
            reply = await client._stub.PublishBatch(request)
    assert [(r.code, r.response.sequence) for r in reply.results] == [(0, 2), (0, 3), (0, 4)]
