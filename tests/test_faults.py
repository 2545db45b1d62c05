"""Faults during the end-to-end load: G1 (order), G2 (acked means stored) and G5
(sequences never restart) hold through each, and every event lands exactly once."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

from tests.support.load import (
    EVENTS_EACH,
    PRODUCERS,
    Producers,
    check_exactly_once_in_order,
    sidecar_options,
    start_producers,
    wait_for_messages,
)
from tests.support.servers import RedisServer, SidecarProcess

from .conftest import World

FAULT_AFTER = PRODUCERS * EVENTS_EACH // 5
LOCK_TTL = 2.0


async def run_with_fault(
    world: World, fault: Callable[[list[SidecarProcess]], Awaitable[None]]
) -> None:
    options = sidecar_options(world.nats_server, world.redis_server, world.names)
    running = [world.sidecars(f"sidecar-{n}", **options) for n in range(3)]
    producers = Producers(world.tmp_path)
    start_producers(producers, running)
    await wait_for_messages(world.nc, world.stream, FAULT_AFTER, timeout=120)
    await fault(running)
    assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    await check_exactly_once_in_order(world.nc, world.nats_server.url, world.stream, producers)


async def test_sigkill_a_sidecar_then_restart_it(world: World) -> None:
    async def kill_and_restart(running: list[SidecarProcess]) -> None:
        running[0].kill()
        assert not running[0].running
        running[0].start()

    await run_with_fault(world, kill_and_restart)


async def test_sigstop_a_sidecar_past_the_lock_ttl(world: World) -> None:
    async def pause_past_ttl(running: list[SidecarProcess]) -> None:
        running[0].pause()
        paused_at = time.monotonic()
        count = FAULT_AFTER
        try:
            # Others must have moved on while it sleeps, and its locks must have expired.
            await wait_for_messages(world.nc, world.stream, count + 300, timeout=120)
            while time.monotonic() - paused_at < 2 * LOCK_TTL:
                await wait_for_messages(world.nc, world.stream, count + 301, timeout=120)
                count += 1
        finally:
            running[0].resume()

    await run_with_fault(world, pause_past_ttl)


async def test_redis_restarts_with_its_data_gone(world: World) -> None:
    redis = RedisServer(world.tmp_path / "own-redis")
    redis.start()

    async def restart_redis(running: list[SidecarProcess]) -> None:
        redis.kill()
        redis.start()

    try:
        await run_with_fault(dataclasses.replace(world, redis_server=redis), restart_redis)
    finally:
        redis.kill()
