"""End to end: 3 sidecar processes, 6 producer processes, 24 shared entities.

The same check run on naive direct publishing must find violations, so the check
itself is shown to be able to fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from tests.support.helpers import sidecar_status
from tests.support.load import (
    ENTITIES,
    EVENTS_EACH,
    PRODUCERS,
    Producers,
    check_exactly_once_in_order,
    run_verify,
    sidecar_options,
    start_producers,
)
from tests.support.servers import NatsServer, RedisServer, SidecarProcess

from .conftest import World


@pytest.mark.parametrize("lock_backend", ["redis", "redis-quorum-3", "nats-kv"])
async def test_sidecars_keep_every_entity_in_order(lock_backend: str, world: World) -> None:
    nats_server, redis_server, names = world.nats_server, world.redis_server, world.names
    sidecars, nc, tmp_path = world.sidecars, world.nc, world.tmp_path
    backend = "redis" if lock_backend.startswith("redis") else "nats-kv"
    options = sidecar_options(nats_server, redis_server, names, backend)
    masters = [RedisServer(tmp_path, f"master-{n}") for n in range(2)]
    if lock_backend == "redis-quorum-3":
        for master in masters:
            master.start()
        options["redis_url"] = ",".join([redis_server.url, *(m.url for m in masters)])
    running = [sidecars(f"sidecar-{n}", **options) for n in range(3)]
    producers = Producers(tmp_path)
    start_producers(producers, running)
    try:
        assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    finally:
        for master in masters:
            master.kill()
    await check_exactly_once_in_order(nc, nats_server.url, names["stream"], producers)
    assert f"locks: {backend}" in running[0].log_path.read_text()
    await check_group_commit_was_used(running)


async def check_group_commit_was_used(running: list[SidecarProcess]) -> None:
    """The run went through atomic batches, not only one event per round trip."""
    statuses = [await sidecar_status(sidecar.target) for sidecar in running]
    assert {status.publish_path for status in statuses} == {"group-commit"}
    assert sum(status.batches_committed for status in statuses) > 0
    assert sum(s.batched_events for s in statuses) > sum(s.batches_committed for s in statuses)


async def test_sidecars_keep_order_one_by_one(world: World) -> None:
    """The path for servers without atomic batches (and --no-group-commit) keeps order too."""
    options = sidecar_options(world.nats_server, world.redis_server, world.names)
    options["no_group_commit"] = ""
    running = [world.sidecars(f"sidecar-{n}", **options) for n in range(3)]
    producers = Producers(world.tmp_path)
    start_producers(producers, running)
    assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    await check_exactly_once_in_order(world.nc, world.nats_server.url, world.stream, producers)
    statuses = [await sidecar_status(sidecar.target) for sidecar in running]
    assert {s.publish_path for s in statuses} == {"one-by-one (--no-group-commit)"}
    assert sum(s.batches_committed for s in statuses) == 0


async def test_sidecars_keep_order_through_publish_stream_at_full_speed(world: World) -> None:
    options = sidecar_options(world.nats_server, world.redis_server, world.names)
    running = [world.sidecars(f"sidecar-{n}", **options) for n in range(3)]
    producers = Producers(world.tmp_path)
    start_producers(producers, running, api="stream")
    assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    await check_exactly_once_in_order(world.nc, world.nats_server.url, world.stream, producers)
    await check_group_commit_was_used(running)


async def test_verify_finds_violations_of_naive_publishers(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    nc: NatsClient,
    tmp_path: Path,
) -> None:
    await nc.jsm().add_stream(name=names["stream"], subjects=[f"{names['subject_prefix']}.>"])
    producers = Producers(tmp_path)
    for n in range(PRODUCERS):
        producers.start(
            "naive",
            f"naive-{n}",
            nats_url=nats_server.url,
            redis_url=redis_server.url,
            subject_prefix=names["subject_prefix"],
            entities=ENTITIES,
            events=EVENTS_EACH,
            tasks=4,
        )
    assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    status, report = run_verify(nats_server.url, names["stream"])
    assert report["patient"]["events"] == PRODUCERS * EVENTS_EACH
    assert report["patient"]["inversions"] > 0
    assert status == 1
