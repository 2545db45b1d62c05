"""Lock retention and hand-over between sidecars, and remembered positions.

Real NATS and Redis, two in-process sidecars sharing them. Each hand-over test is set
up so that it fails without the mechanism it checks: the lock lingers far longer than
the other sidecar is willing to wait, so only a hand-over lets its publish through.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.core.hints import PositionHints
from order_sidecar.core.model import EntityPosition
from order_sidecar.locks.nats_kv import NatsKvLockBackend
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import request, stream_messages
from tests.support.servers import NatsServer

BACKENDS = ["redis", "nats-kv"]
# Lingering (20 s) far outlasts the wait (2 s): without a hand-over, the second sidecar
# would answer ABORTED (contention).
LINGERING = {"lock_ttl": 60.0, "lock_linger": 20.0, "lock_wait": 2.0}

Starter = Callable[..., Awaitable[SidecarApp]]


@pytest.fixture
async def start_sidecar(serve_config: ServeConfig, names: dict[str, str]) -> AsyncIterator[Starter]:
    async with AsyncExitStack() as stack:

        async def start(backend: str, **options: object) -> SidecarApp:
            config = dataclasses.replace(
                serve_config,
                lock_backend=backend,
                lock_bucket=names["lock_bucket"],
                **options,  # type: ignore[arg-type]
            )
            sidecar = SidecarApp(config)
            await sidecar.start()
            stack.push_async_callback(sidecar.stop)
            return sidecar

        yield start


async def publish(sidecar: SidecarApp, entity_id: str, n: int) -> sidecar_pb2.PublishResponse:
    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        reply: sidecar_pb2.PublishResponse = await stub.Publish(
            request(entity_id, payload=b"%d" % n), timeout=10
        )
        return reply


def acquires(sidecar: SidecarApp, backend: str) -> float:
    """How many lock acquisitions the sidecar has made (from its metrics)."""
    value = sidecar.metrics.registry.get_sample_value(
        "ordersidecar_lock_acquire_seconds_count", {"backend": backend, "outcome": "acquired"}
    )
    return value or 0.0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_idle_entity_keeps_its_lock_and_position(
    start_sidecar: Starter, backend: str
) -> None:
    sidecar = await start_sidecar(backend, **LINGERING)
    replies = [await publish(sidecar, "keep", n) for n in range(5)]
    assert [r.sequence for r in replies] == [1, 2, 3, 4, 5]
    # One acquisition for five events written one after another: the lock lingered.
    assert acquires(sidecar, backend) == 1
    gates = sidecar.publisher._gates  # type: ignore[union-attr]
    assert gates.lingering == 1 and gates.busy_entities == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_waiting_sidecar_gets_a_lingering_lock_handed_over(
    start_sidecar: Starter, backend: str, nc: NatsClient, names: dict[str, str]
) -> None:
    first = await start_sidecar(backend, **LINGERING)
    second = await start_sidecar(backend, **LINGERING)
    assert (await publish(first, "shared", 0)).sequence == 1
    # The first sidecar lingers with the lock for 20 s; the second waits 2 s at most.
    assert (await publish(second, "shared", 1)).sequence == 2
    # And back: the second sidecar now lingers, and hands over in turn.
    third = await publish(first, "shared", 2)
    assert third.sequence == 3
    # The first sidecar's remembered position was stale (the second wrote in between):
    # the broker refused it, the sidecar re-read, and no fencing conflict was counted.
    stats = first.publisher.stats  # type: ignore[union-attr]
    assert stats.stale_guesses == 1
    assert stats.fenced == 0
    stored = await stream_messages(nc, names["stream"])
    assert [m.headers["Entity-Sequence"] for m in stored] == ["1", "2", "3"]
    assert [m.payload for m in stored] == [b"0", b"1", b"2"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_hot_entity_is_shared_by_busy_sidecars(
    start_sidecar: Starter, backend: str, nc: NatsClient, names: dict[str, str]
) -> None:
    sidecars = [await start_sidecar(backend, **LINGERING) for _ in range(3)]
    per_sidecar = 40

    async def writer(sidecar: SidecarApp, lane: int) -> list[int]:
        async with grpc.aio.insecure_channel(sidecar.target) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            calls = [
                stub.Publish(request("hot", payload=b"%d-%d" % (lane, n)), timeout=30)
                for n in range(per_sidecar)
            ]
            return [reply.sequence for reply in await asyncio.gather(*calls)]

    results = await asyncio.gather(*(writer(s, i) for i, s in enumerate(sidecars)))
    # Every sidecar got its events through although each keeps the lock while busy.
    assert sorted(seq for lane in results for seq in lane) == list(range(1, 3 * per_sidecar + 1))
    stored = await stream_messages(nc, names["stream"])
    assert [int(m.headers["Entity-Sequence"]) for m in stored] == list(
        range(1, 3 * per_sidecar + 1)
    )


def test_position_hints_forget_the_least_recently_used() -> None:
    hints = PositionHints(capacity=2)
    for n, key in enumerate(["a", "b", "c"]):
        hints.remember(key, EntityPosition(n, n))
    assert len(hints) == 2
    assert hints.take("a") is None
    assert hints.take("c") == EntityPosition(2, 2)
    assert hints.take("c") is None
    off = PositionHints(capacity=0)
    off.remember("a", EntityPosition(1, 1))
    assert len(off) == 0


async def test_stopping_with_lingering_locks_and_nats_paused_is_bounded(
    serve_config: ServeConfig, tmp_path: Path
) -> None:
    """Lingering locks are released at shutdown, but a paused backend must not hold the
    stop up: each release would wait for its own timeout (20 x 2 s here)."""
    nats_server = NatsServer(tmp_path)
    nats_server.start()
    config = dataclasses.replace(
        serve_config,
        nats_url=nats_server.url,
        lock_backend="nats-kv",
        **LINGERING,  # type: ignore[arg-type]
    )
    sidecar = SidecarApp(config)
    await sidecar.start()
    try:
        for n in range(20):
            await publish(sidecar, f"linger-{n}", n)
        assert sidecar.publisher is not None
        assert sidecar.publisher._gates.lingering == 20
        nats_server.pause()
        await asyncio.wait_for(sidecar.stop(), timeout=25)
    finally:
        nats_server.resume()
        nats_server.kill()


async def test_nats_kv_waiters_of_one_sidecar_take_turns_in_arrival_order(
    nc: NatsClient, names: dict[str, str]
) -> None:
    """Local waiters contend one at a time, first come first served, so a freed lock is
    not stormed by all of them (and none starves behind later arrivals)."""
    backend = await NatsKvLockBackend.open(nc, names["lock_bucket"], lock_ttl=10.0)
    holder = await backend.acquire("turns", 10.0, 0.0)
    assert holder is not None
    order: list[int] = []

    async def waiter(n: int) -> None:
        lease = await backend.acquire("turns", 10.0, 20.0)
        assert lease is not None
        order.append(n)
        await backend.release(lease)

    waiters = []
    for n in range(12):
        waiters.append(asyncio.ensure_future(waiter(n)))
        await asyncio.sleep(0)  # let it queue before the next one arrives
    await backend.release(holder)
    await asyncio.gather(*waiters)
    assert order == list(range(12))
    await backend.close()
