"""Batches: a partition's fetched events applied in one transaction, acked after it.

A replica SIGKILLed right after a batch's commit has acked none of it: the batch is
redelivered and every event skipped. One SIGKILLed inside the handler, in the middle of
a batch, has committed and acked none of it: everything is applied by the next replica.
A poison event inside a batch costs its neighbours nothing (they are applied once, in
order) and leaves no half-written trace; a lease that runs out during a batch ends the
batch there, and the rest is handed back unapplied.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar_client import contract
from order_sidecar_client.consumer import (
    ConsumerConfig,
    ConsumerConfigError,
    EntityEvent,
    EntityKey,
    OrderedConsumer,
    SqlitePositionStore,
    StaticAssignment,
    list_dead,
)

from tests.support.consumer import (
    PARTITIONS,
    Recorder,
    ReplicaProcess,
    apply_log,
    check_applies,
    commit_sizes,
    create_stream,
    ids_where,
    in_order,
    make_consumer,
    publish,
    replica_rows,
    running,
    wait_for,
)
from tests.support.servers import NatsServer

ENTITIES = {f"e{n}": 10 for n in range(6)}
TOTAL = sum(ENTITIES.values())


def options(nats_server: NatsServer, names: dict[str, str], db: Path) -> dict[str, str]:
    return {"nats_url": nats_server.url, "stream": names["stream"], "db": str(db), "ack_wait": "1"}


def outcomes(replica: ReplicaProcess) -> dict[str, float]:
    """The delivery outcomes a cleanly stopped replica printed."""
    line = replica.log_path.read_text().split("OUTCOMES ", 1)[1].splitlines()[0]
    return dict(json.loads(line))


async def partition_acks(nc: NatsClient, names: dict[str, str]) -> dict[int, tuple[int, int]]:
    """Partition -> (ack floor, events delivered and not acked) of the example's durables."""
    found: dict[int, tuple[int, int]] = {}
    for partition in range(PARTITIONS):
        info = await nc.jetstream().consumer_info(names["stream"], f"replicate-p{partition}")
        assert info.ack_floor is not None and info.num_ack_pending is not None
        found[partition] = (info.ack_floor.stream_seq, info.num_ack_pending)
    return found


async def all_acked(nc: NatsClient, names: dict[str, str]) -> bool:
    """Every partition's events delivered and acked."""
    js = nc.jetstream()
    for partition in range(PARTITIONS):
        info = await js.consumer_info(names["stream"], f"replicate-p{partition}")
        if info.num_pending or info.num_ack_pending:
            return False
    return True


def events_of_partition(partition: int) -> list[tuple[str, str, int]]:
    """The stream's events of *partition*, in stream order, as apply-log rows."""
    return [
        ("patient", entity_id, sequence)
        for entity_id, sequence, _ in in_order(ENTITIES)
        if contract.partition_of(entity_id, PARTITIONS) == partition
    ]


async def test_a_crash_after_a_batch_commit_replays_the_batch_as_skipped(
    nc: NatsClient, names: dict[str, str], nats_server: NatsServer, tmp_path: Path
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, in_order(ENTITIES))
    db = tmp_path / "replica.db"
    a = ReplicaProcess(
        tmp_path, "a", {**options(nats_server, names, db), "crash_after_commit": "1"}
    )
    b = ReplicaProcess(tmp_path, "b", options(nats_server, names, db))
    try:
        a.start()
        assert a.exit_code(60) == -signal.SIGKILL
        # A's one commit holds its first partition's whole backlog: one transaction.
        committed = apply_log(db)
        partition = contract.partition_of(committed[0][1], PARTITIONS)
        assert committed == events_of_partition(partition)
        assert commit_sizes(db) == [len(committed)] and len(committed) > 1
        # ... and A died before acking any of it.
        assert (await partition_acks(nc, names))[partition] == (0, len(committed))
        b.start()
        await wait_for(lambda: replica_rows(db) == ENTITIES, 60, "the replica to catch up")
        await wait_for(lambda: all_acked(nc, names), 30, "every event acked")
        assert b.terminate() == 0
    finally:
        a.kill()
        b.kill()
    report = check_applies(apply_log(db))
    assert (report.gaps, report.duplicates, report.inversions) == (0, 0, 0)
    assert report.events == TOTAL
    # B got A's committed batch again and skipped every event of it, applied the rest.
    counts = outcomes(b)
    assert (counts["skipped"], counts["applied"]) == (len(committed), TOTAL - len(committed))


async def test_a_crash_inside_a_batch_commits_and_acks_none_of_it(
    nc: NatsClient, names: dict[str, str], nats_server: NatsServer, tmp_path: Path
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, in_order(ENTITIES))
    db = tmp_path / "replica.db"
    # The 3rd handler call is in the middle of A's first batch (every partition holds
    # at least one entity's 10 events, all in the stream before A starts).
    a = ReplicaProcess(tmp_path, "a", {**options(nats_server, names, db), "crash_in_handler": "3"})
    b = ReplicaProcess(tmp_path, "b", options(nats_server, names, db))
    try:
        a.start()
        assert a.exit_code(60) == -signal.SIGKILL
        assert apply_log(db) == []  # two events were written in the batch: rolled back
        assert all(floor == 0 for floor, _ in (await partition_acks(nc, names)).values())
        b.start()
        await wait_for(lambda: replica_rows(db) == ENTITIES, 60, "the replica to catch up")
        await wait_for(lambda: all_acked(nc, names), 30, "every event acked")
        assert b.terminate() == 0
    finally:
        a.kill()
        b.kill()
    report = check_applies(apply_log(db))
    assert (report.gaps, report.duplicates, report.inversions) == (0, 0, 0)
    assert report.events == TOTAL
    assert outcomes(b)["applied"] == TOTAL  # nothing was lost to an early ack


async def test_a_poison_event_inside_a_batch_neither_loses_nor_double_applies_its_neighbours(
    nc: NatsClient, names: dict[str, str], tmp_path: Path
) -> None:
    await create_stream(nc, names)
    partition = contract.partition_of("p", PARTITIONS)
    a, b, c = ids_where("n", True, partition, 3)  # p's partition mates: one batch with it
    await publish(nc, names, [("p", 1, b"ok"), (a, 1, b"ok"), (b, 1, b"ok")])
    await publish(nc, names, [("p", 2, b"poison"), (c, 1, b"ok"), (a, 2, b"ok")])
    await publish(nc, names, [("p", 3, b"ok"), (b, 2, b"ok"), (c, 2, b"ok")])
    handler = Recorder()
    handler.poison = b"poison"  # written, then raises: the write must not survive
    consumer, store = make_consumer(nc, names, tmp_path, handler, max_deliveries=3, backoff=(0.05,))
    config = consumer.config

    async def dead() -> list[tuple[str, str]]:
        entries = await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix)
        return [(d.key.entity_id, d.headers["Entity-Sequence"]) for d in entries]

    async def settled() -> bool:
        return await dead() == [("p", "2"), ("p", "3")] and handler.of(c) == [1, 2]

    async with running(consumer):
        await wait_for(settled, 30, "p#2 and p#3 dead-lettered and the neighbours applied")
    # Committed once each, in stream order; the poison event's write is not there.
    assert handler.applied == [
        ("p", 1),
        (a, 1),
        (b, 1),
        (c, 1),
        (a, 2),
        (b, 2),
        (c, 2),
    ]
    assert [(x.key, x.sequence) for x in store.blocks()] == [(EntityKey("patient", "p"), 2)]
    # The first batch ran p#1, a#1, b#1 and failed on p#2: rolled back and run again.
    assert handler.calls > len(handler.applied) + 3
    metrics = consumer.metrics
    assert metrics.events.labels("applied")._value.get() == 7
    assert metrics.dead_lettered.labels("max_deliveries")._value.get() == 1


class FlakyLease(StaticAssignment):
    """A lease that runs out when the test says so (a renewal that did not come)."""

    def __init__(self) -> None:
        super().__init__(1, 0)
        self.ok = True

    def valid(self, partition: int) -> bool:
        return self.ok

    def remaining(self, partition: int) -> float:
        return 60.0 if self.ok else 0.0


async def test_a_batch_ends_where_its_lease_runs_out_and_hands_the_rest_back(
    nc: NatsClient, names: dict[str, str], tmp_path: Path
) -> None:
    await create_stream(nc, names)
    partition = contract.partition_of("x", PARTITIONS)
    await publish(nc, names, [("x", n, b"") for n in range(1, 21)])
    lease = FlakyLease()
    seen: list[int] = []

    async def handler(event: EntityEvent, tx: sqlite3.Connection) -> None:
        seen.append(event.sequence)
        if event.sequence == 5:
            lease.ok = False  # the lease lapses while the 5th event is applied

    store = SqlitePositionStore(tmp_path / "positions.db")
    config = ConsumerConfig(stream=names["stream"], name="c", fetch_timeout=0.2)
    consumer = OrderedConsumer(nc, config, store, handler, lease)
    durable = f"c-p{partition}"
    js = nc.jetstream()

    async def handed_back() -> bool:
        info = await js.consumer_info(names["stream"], durable)
        return info.ack_floor is not None and info.ack_floor.stream_seq == 5

    async with running(consumer):
        await wait_for(lambda: seen[-1:] == [5], 10, "the 5th event applied")
        await wait_for(handed_back, 10, "the first 5 acked")
        assert seen == [1, 2, 3, 4, 5]  # nothing after the lapse was applied
        # The rest was handed back (NAK'd), not left to the ack wait (10 s): a peer
        # gets it at once, in order. The peer gives it back in turn.
        peer = await js.pull_subscribe_bind(durable=durable, stream=names["stream"])
        rest = await peer.fetch(15, timeout=3)
        assert [m.metadata.sequence.stream for m in rest] == list(range(6, 21))
        assert {m.metadata.num_delivered for m in rest} == {2}
        for msg in rest:
            await msg.nak()
        await peer.unsubscribe()
        lease.ok = True  # the partition is held again (a renewal came through)
        await wait_for(lambda: len(seen) == 20, 20, "the rest applied")
    assert seen == list(range(1, 21))
    assert await store.applied(store.connection, EntityKey("patient", "x")) == 20


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer from 1 to 10000, got 0"),
        ({"batch_size": 10_001}, "got 10001"),
        ({"batch_size": True}, "got True"),
        ({"batch_size": 2.5}, "got 2.5"),
        ({"batch_max_seconds": 0}, "batch_max_seconds must be positive, got 0"),
        ({"batch_max_seconds": -1.0}, "got -1.0"),
    ],
)
def test_batch_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConsumerConfigError, match=message):
        ConsumerConfig("S", **settings)  # type: ignore[arg-type]
