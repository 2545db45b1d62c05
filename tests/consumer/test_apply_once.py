"""Apply-once against a real nats-server: duplicates, gaps (both policies), redelivery."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar_client import contract
from order_sidecar_client.consumer import (
    EntityEvent,
    EntityKey,
    GapError,
    GapPolicy,
    list_dead,
)

from tests.support.consumer import (
    PARTITIONS,
    Recorder,
    create_stream,
    make_consumer,
    publish,
    running,
    wait_for,
)


async def test_duplicates_are_acked_and_skipped_and_a_gap_goes_to_the_dlq(
    nc: NatsClient, names: dict[str, str], tmp_path: Path
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, [("a", 1, b""), ("a", 2, b""), ("a", 2, b""), ("a", 1, b"")])
    await publish(nc, names, [("a", 3, b""), ("b", 1, b""), ("b", 2, b""), ("b", 4, b"")])
    await publish(nc, names, [("b", 5, b""), ("c", 1, b"")])
    handler = Recorder()
    consumer, store = make_consumer(nc, names, tmp_path, handler, gap_wait=0.5, backoff=(0.1,))
    dlq = consumer.config

    async def settled() -> bool:
        dead = await list_dead(nc, dlq.dlq_stream_name, dlq.dlq_subject_prefix)
        return len(dead) == 2 and handler.of("c") == [1]

    async with running(consumer):
        await wait_for(settled, 30, "the gap and the blocked event in the DLQ")
    assert handler.of("a") == [1, 2, 3]
    assert handler.of("b") == [1, 2]
    dead = await list_dead(nc, dlq.dlq_stream_name, dlq.dlq_subject_prefix)
    assert [(d.key.entity_id, d.headers["Entity-Sequence"]) for d in dead] == [
        ("b", "4"),
        ("b", "5"),
    ]
    assert "gap: sequence 4 after applied 2" in dead[0].headers["Dlq-Reason"]
    assert "blocked" in dead[1].headers["Dlq-Reason"]
    assert [(b.key, b.sequence) for b in store.blocks()] == [(EntityKey("patient", "b"), 4)]
    skipped = consumer.metrics.events.labels("skipped")._value.get()
    assert skipped == 2


async def test_a_gap_with_the_fail_policy_stops_the_consumer_loudly(
    nc: NatsClient, names: dict[str, str], tmp_path: Path
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, [("a", 1, b""), ("a", 3, b"")])
    handler = Recorder()
    consumer, _ = make_consumer(
        nc, names, tmp_path, handler, gap_wait=0.3, gap_policy=GapPolicy.FAIL, backoff=(0.1,)
    )
    with pytest.raises(GapError, match="sequence 3 after applied 1"):
        await asyncio.wait_for(consumer.run(), 30)
    assert handler.of("a") == [1]


async def test_a_slow_handler_is_kept_alive_by_in_progress_heartbeats(
    nc: NatsClient, names: dict[str, str], tmp_path: Path
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, [("slow", 1, b""), ("slow", 2, b"")])
    durable = f"c-p{contract.partition_of('slow', PARTITIONS)}"
    deliveries: list[int] = []
    stolen: list[int] = []

    async def slow(event: EntityEvent, tx: sqlite3.Connection) -> None:
        deliveries.append(event.deliveries)
        if event.sequence == 1:
            # The slow work: 2.5 ack waits, spent as a peer pulling from the same
            # partition consumer. It gets the event only if the ack wait lapses.
            peer = await nc.jetstream().pull_subscribe_bind(durable=durable, stream=names["stream"])
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                stolen.extend(m.metadata.sequence.stream for m in await peer.fetch(1, timeout=2.5))
            await peer.unsubscribe()

    consumer, _ = make_consumer(nc, names, tmp_path, slow, ack_wait=1.0)
    async with running(consumer):
        await wait_for(lambda: len(deliveries) == 2, 30, "both events handled")
    assert stolen == []
    assert deliveries == [1, 1]  # never redelivered although it outlived the ack wait
