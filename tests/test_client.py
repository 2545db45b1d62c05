"""The Python client, sync and asyncio, against real sidecars."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.runtime.app import SidecarApp
from order_sidecar_client import (
    AsyncSidecarClient,
    Event,
    Published,
    RetryPolicy,
    SidecarClient,
    SidecarError,
)

from tests.support.helpers import message_count, stream_messages
from tests.support.load import sidecar_options
from tests.support.servers import NatsServer, RedisServer, SidecarProcess, wait_until


async def test_async_client_publishes_and_batches(app: SidecarApp) -> None:
    async with AsyncSidecarClient(app.target) as client:
        first = await client.publish(Event("order", "o-1", "create", b"{}"))
        results = await client.publish_batch(
            [Event("order", "o-1", "update"), Event("order", "o-2", "create")]
        )
    assert first.sequence == 1
    assert [r.sequence for r in results if isinstance(r, Published)] == [2, 1]


def test_sync_client_reports_non_retryable_errors(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
) -> None:
    # A sidecar process: the blocking client would stall an in-process sidecar's loop.
    sidecar = sidecars("sync", **sidecar_options(nats_server, redis_server, names))
    with SidecarClient(sidecar.target) as client:
        assert client.publish(Event("order", "s-1", "create")).sequence == 1
        with pytest.raises(SidecarError) as caught:
            client.publish(Event("bad type", "s-1", "create"))
        results = client.publish_batch(
            [Event("order", "s-1", "update"), Event("bad type", "x", "update")]
        )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not caught.value.retryable
    assert isinstance(results[0], Published) and results[0].sequence == 2
    assert isinstance(results[1], SidecarError)
    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT


def test_event_refuses_unknown_operation() -> None:
    with pytest.raises(ValueError, match="upsert"):
        Event("order", "1", "upsert")


def test_unreachable_sidecar_is_unavailable_after_retries() -> None:
    policy = RetryPolicy(attempts=2, first_backoff=0.01, attempt_timeout=1.0)
    with (
        SidecarClient("127.0.0.1:1", retry=policy) as client,
        pytest.raises(SidecarError) as caught,
    ):
        client.publish(Event("order", "1", "create"))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.retryable


async def test_async_client_rides_out_a_sidecar_restart_without_duplicates(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
) -> None:
    sidecar = sidecars("restarting", **sidecar_options(nats_server, redis_server, names))
    patient = RetryPolicy(attempts=100, first_backoff=0.05, max_backoff=0.2, attempt_timeout=2.0)
    async with AsyncSidecarClient(sidecar.target, retry=patient) as client:
        events = [Event("order", f"r{n % 3}", "update", b"%d" % n) for n in range(60)]
        results: list[Published] = []
        for n, event in enumerate(events):
            if n == 30:
                sidecar.kill()
                restart = asyncio.get_running_loop().run_in_executor(None, sidecar.start)
            results.append(await client.publish(event))
        await restart
    assert [r.sequence for r in results] == [n // 3 + 1 for n in range(60)]
    assert await message_count(nc, names["stream"]) == 60


def test_sync_lease_is_renewed_by_a_thread_and_released(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecars("sync-lease", **sidecar_options(nats_server, redis_server, names))
    with SidecarClient(sidecar.target) as client:
        with client.lease("order", "l1", ttl=1.0) as lease:
            first_expiry = lease.info.expires_at.timestamp()
            wait_until(
                lambda: lease.info.expires_at.timestamp() > first_expiry + 1.0,
                5.0,
                "the renewal thread to extend the lease",
            )
            published = lease.publish(Event("order", "l1", "create", entity_version=1))
            assert lease.renewal_error is None
        # Released on exit: another lease is granted at once.
        with client.lease("order", "l1", ttl=1.0, wait=0.0) as again:
            assert again.fencing_token == published.sequence == 1
            assert again.info.last_version == 1


async def test_batch_never_resends_events_behind_a_final_failure(
    app: SidecarApp, nc: NatsClient
) -> None:
    async with AsyncSidecarClient(app.target) as client:
        await client.publish(Event("order", "b1", "create", entity_version=5))
        results = await client.publish_batch(
            [
                Event("order", "b1", "update", b"a", entity_version=6),
                Event("order", "b1", "update", b"b", entity_version=6),  # stale now
                Event("order", "b1", "update", b"c", entity_version=7),
                Event("order", "b2", "create"),
            ]
        )
    codes = [r.code if isinstance(r, SidecarError) else grpc.StatusCode.OK for r in results]
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OK,
    ]
    stored = await stream_messages(nc, app.config.stream)
    assert [m.headers.get("Entity-Version") for m in stored if m.headers["Entity-Id"] == "b1"] == [
        "5",
        "6",
    ]


def test_pending_indexes_stop_at_a_final_failure() -> None:
    from order_sidecar_client.retries import finish_results, pending_indexes

    events = [Event("t", "x", "update"), Event("t", "x", "update"), Event("t", "y", "update")]
    aborted = SidecarError(grpc.StatusCode.ABORTED, "retry")
    invalid = SidecarError(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert pending_indexes(events, [invalid, aborted, aborted]) == [2]
    final = finish_results(events, [invalid, aborted, None])
    assert isinstance(final[1], SidecarError)
    assert final[1].code == grpc.StatusCode.FAILED_PRECONDITION
