"""The ``wait`` blocked policy: a poison event reaches the DLQ and blocks its entity; the
entity's later events are held in the stream (not applied, not dead-lettered) and hold
their partition, while other partitions keep flowing; after the fix a replay applies the
poison event and the held ones once, in order, and the partition moves on."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar_client import contract
from order_sidecar_client.consumer import BlockedPolicy, EntityKey, list_dead, request_replay

from tests.support.consumer import (
    PARTITIONS,
    Recorder,
    create_stream,
    ids_where,
    in_order,
    make_consumer,
    publish,
    running,
    wait_for,
)


@pytest.mark.parametrize("batch_size", [1, 256], ids=["one-by-one", "batches"])
async def test_wait_policy_holds_a_blocked_entity_in_the_stream_until_replay(
    nc: NatsClient, names: dict[str, str], tmp_path: Path, batch_size: int
) -> None:
    await create_stream(nc, names)
    held = contract.partition_of("p", PARTITIONS)
    [neighbour] = ids_where("r", True, held, 1)  # same partition as p, behind p's events
    others = ids_where("q", False, held, 3)  # other partitions
    await publish(nc, names, [("p", 1, b"ok"), ("p", 2, b"poison"), ("p", 3, b"ok")])
    await publish(nc, names, [("p", 4, b"ok"), (neighbour, 1, b"ok")])
    handler = Recorder()
    handler.poison = b"poison"
    consumer, store = make_consumer(
        nc,
        names,
        tmp_path,
        handler,
        blocked_policy=BlockedPolicy.WAIT,
        batch_size=batch_size,
        max_deliveries=3,
        backoff=(0.05, 0.2),
    )
    config = consumer.config
    metrics = consumer.metrics
    js = nc.jetstream()

    def outcome(name: str) -> float:
        return float(metrics.events.labels(name)._value.get())

    async def dead() -> list[tuple[str, str]]:
        entries = await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix)
        return [(d.key.entity_id, d.headers["Entity-Sequence"]) for d in entries]

    async def dlq_empty() -> bool:
        return await dead() == []

    async with running(consumer):
        await wait_for(lambda: len(store.blocks()) == 1, 30, "p blocked by its poison event")
        assert [(b.key, b.sequence) for b in store.blocks()] == [(EntityKey("patient", "p"), 2)]

        # While p is blocked, other partitions keep flowing; p#3 is offered and held
        # again and again. Both conditions together, not a sleep, bound the check.
        await publish(nc, names, in_order(dict.fromkeys(others, 3)))
        await wait_for(
            lambda: all(handler.of(q) == [1, 2, 3] for q in others) and outcome("blocked") >= 3,
            20,
            "the other partitions applied while p#3 is held at least 3 times",
        )
        assert handler.of("p") == [1]
        assert handler.of(neighbour) == []  # the whole partition waits behind p#3
        assert await dead() == [("p", "2")]  # p#3, p#4 were not dead-lettered
        info = await js.consumer_info(names["stream"], f"{config.name}-p{held}")
        # One by one: p#3 delivered and unacked, p#4 and the neighbour never delivered.
        # In batches all three came in p's batch and are held unacked behind p#3. Either
        # way all three are still in the stream, none acked.
        held_in_stream = (1, 2) if batch_size == 1 else (3, 0)
        assert (info.num_ack_pending, info.num_pending) == held_in_stream
        assert metrics.dead_lettered.labels("blocked")._value.get() == 0

        handler.poison = None  # the handler is fixed
        entries = await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix)
        assert await request_replay(js, config.dlq_subject_prefix, entries) == 1
        await wait_for(
            lambda: handler.of("p") == [1, 2, 3, 4] and handler.of(neighbour) == [1],
            20,
            "p re-driven and its partition moving again",
        )
        await wait_for(dlq_empty, 10, "the DLQ purged of p")
    assert store.blocks() == []
    # Once, in order: p#2..4 after p#1, and the neighbour only after all of p.
    order = [(e, s) for e, s in handler.applied if e in ("p", neighbour)]
    assert order == [("p", 1), ("p", 2), ("p", 3), ("p", 4), (neighbour, 1)]
    # p#1 re-read by the replay, then p#3 and p#4 delivered again by the partition.
    assert outcome("skipped") == 3
