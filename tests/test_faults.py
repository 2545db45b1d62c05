"""Faults during the end-to-end load: G1 (order), G2 (acked means stored) and G5
(sequences never restart) hold through each, and every event lands exactly once."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from nats.aio.client import Client as NatsClient

from .load import Producers, wait_for_messages
from .servers import NatsServer, RedisServer, SidecarProcess
from .test_e2e import (
    EVENTS_EACH,
    PRODUCERS,
    check_exactly_once_in_order,
    sidecar_options,
    start_producers,
)

FAULT_AFTER = PRODUCERS * EVENTS_EACH // 5
LOCK_TTL = 2.0


async def run_with_fault(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
    tmp_path: Path,
    fault: Callable[[list[SidecarProcess]], Awaitable[None]],
) -> None:
    options = sidecar_options(nats_server, redis_server, names)
    running = [sidecars(f"sidecar-{n}", **options) for n in range(3)]
    producers = Producers(tmp_path)
    start_producers(producers, running)
    await wait_for_messages(nc, names["stream"], FAULT_AFTER, timeout=120)
    await fault(running)
    assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    await check_exactly_once_in_order(nc, nats_server.url, names["stream"], producers)


async def test_sigkill_a_sidecar_then_restart_it(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    async def kill_and_restart(running: list[SidecarProcess]) -> None:
        running[0].kill()
        assert not running[0].running
        running[0].start()

    await run_with_fault(nats_server, redis_server, names, sidecars, nc, tmp_path, kill_and_restart)


async def test_sigstop_a_sidecar_past_the_lock_ttl(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    async def pause_past_ttl(running: list[SidecarProcess]) -> None:
        running[0].pause()
        paused_at = time.monotonic()
        count = FAULT_AFTER
        try:
            # Others must have moved on while it sleeps, and its locks must have expired.
            await wait_for_messages(nc, names["stream"], count + 300, timeout=120)
            while time.monotonic() - paused_at < 2 * LOCK_TTL:
                await wait_for_messages(nc, names["stream"], count + 301, timeout=120)
                count += 1
        finally:
            running[0].resume()

    await run_with_fault(nats_server, redis_server, names, sidecars, nc, tmp_path, pause_past_ttl)


async def test_redis_restarts_with_its_data_gone(
    nats_server: NatsServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "own-redis")
    redis.start()

    async def restart_redis(running: list[SidecarProcess]) -> None:
        redis.kill()
        redis.start()

    try:
        await run_with_fault(nats_server, redis, names, sidecars, nc, tmp_path, restart_redis)
    finally:
        redis.kill()
