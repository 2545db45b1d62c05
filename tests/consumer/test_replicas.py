"""Consumer replicas as processes over a stream written by several sidecars.

Three replicas split the partitions through KV leases; one is SIGKILLed mid-run and
another started: every entity's events are still applied once, in sequence order, and
the replica database ends equal to the stream. The replicas apply in batches (the
default), several events per transaction. The same check run on a naive shared
pull consumer finds out-of-order applies, so the check is shown to be able to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig

from tests.support.consumer import (
    ReplicaProcess,
    apply_log,
    check_applies,
    commit_sizes,
    create_stream,
    in_order,
    publish,
    replica_rows,
    wait_for,
)
from tests.support.helpers import stream_messages
from tests.support.load import Producers

from ..conftest import World

PRODUCERS = 3
EVENTS_EACH = 300
ENTITIES = 24


def replica_options(world: World, db: Path) -> dict[str, str]:
    return {
        "nats_url": world.nats_server.url,
        "stream": world.stream,
        "db": str(db),
        "assignment": "kv",
        "lease_ttl": "3",
        "ack_wait": "3",
    }


def appliers(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {str(row[0]) for row in conn.execute("SELECT DISTINCT replica FROM apply_log")}


async def partitions_held(world: World, replica: str) -> bool:
    """Whether *replica* holds a partition lease (the example's default bucket)."""
    kv = await world.nc.jetstream().key_value(f"{world.stream}_LEASES_replicate")
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return False
    for key in keys:
        if key.startswith("partitions."):
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                if (await kv.get(key)).value == replica.encode():
                    return True
    return False


async def source_positions(nc: NatsClient, stream: str) -> dict[str, int]:
    """Entity id -> its last Entity-Sequence in the stream."""
    last: dict[str, int] = {}
    for message in await stream_messages(nc, stream):
        entity_id = message.headers["Entity-Id"]
        last[entity_id] = max(last.get(entity_id, 0), int(message.headers["Entity-Sequence"]))
    return last


async def test_three_replicas_apply_once_in_order_through_a_sigkill(world: World) -> None:
    options = {
        "nats_url": world.nats_server.url,
        "redis_url": world.redis_server.url,
        "stream": world.stream,
        "subject_prefix": world.names["subject_prefix"],
        "lock_ttl": "2",
        "lock_wait": "5",
    }
    sidecars = [world.sidecars(f"sidecar-{n}", **options) for n in range(3)]
    db = world.tmp_path / "replica.db"
    replicas = [
        ReplicaProcess(world.tmp_path, f"replica-{n}", replica_options(world, db)) for n in range(3)
    ]
    producers = Producers(world.tmp_path)
    for n in range(PRODUCERS):
        producers.start(
            "sidecar",
            f"producer-{n}",
            target=sidecars[n].target,
            entities=ENTITIES,
            events=EVENTS_EACH,
            tasks=4,
        )
    try:
        for replica in replicas:
            replica.start()
        await wait_for(
            lambda: len(apply_log(db)) >= 200 and len(appliers(db)) == 3,
            60,
            "all three replicas applying events (partitions rebalanced)",
        )
        replicas[0].kill()
        newcomer = ReplicaProcess(world.tmp_path, "replica-3", replica_options(world, db))
        replicas.append(newcomer)
        newcomer.start()
        # Whether the newcomer still finds events to apply depends on how far the others
        # got; that it takes partitions over (the killed replica's leases lapse) does not.
        await wait_for(
            lambda: partitions_held(world, "replica-3"),
            60,
            "the newcomer to hold partitions",
        )
        assert await producers.wait(90) == [0] * PRODUCERS, producers.log_tail()
        source = await source_positions(world.nc, world.stream)
        assert sum(source.values()) == PRODUCERS * EVENTS_EACH
        await wait_for(lambda: replica_rows(db) == source, 60, "the replica to match the stream")
    finally:
        for replica in replicas:
            replica.kill()
    applies = apply_log(db)
    report = check_applies(applies)
    assert (report.gaps, report.duplicates, report.inversions) == (0, 0, 0)
    assert report.events == PRODUCERS * EVENTS_EACH == len(applies)
    assert report.entities == ENTITIES
    assert {"replica-0", "replica-1", "replica-2"} <= appliers(db)
    # Through the batch path: the backlog at start and the killed replica's unacked
    # events came in batches, each committed in one transaction (counted in it).
    sizes = commit_sizes(db)
    assert sum(sizes) == len(applies) and max(sizes) > 1, sizes


async def test_the_check_finds_out_of_order_applies_of_a_naive_shared_consumer(
    nc: NatsClient, names: dict[str, str]
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, in_order({f"hot{n}": 60 for n in range(4)}))
    js = nc.jetstream()
    await js.add_consumer(
        names["stream"],
        ConsumerConfig(durable_name="naive", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000),
    )
    applies: list[tuple[str, str, int]] = []

    async def naive_worker() -> None:
        sub = await js.pull_subscribe_bind(durable="naive", stream=names["stream"])
        while True:
            try:
                batch = await sub.fetch(5, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                return
            for msg in batch:
                await asyncio.sleep(random.uniform(0, 0.004))  # the handler's own work
                headers = msg.headers or {}
                applies.append(("patient", headers["Entity-Id"], int(headers["Entity-Sequence"])))
                await msg.ack()

    await asyncio.gather(*(naive_worker() for _ in range(6)))
    report = check_applies(applies)
    assert report.events == 240
    assert report.inversions > 0
