"""Malformed messages in the stream (on an entity's subject, published around the
sidecar, without a valid ``Entity-Sequence``) go to the DLQ with a clear reason; they
block nothing and crash nothing: the entity and its partition go on, and a replay of the
entity re-reads past them (dead-lettering them again, so they stay visible)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar_client import contract
from order_sidecar_client.consumer import DeadEntry, list_dead, request_replay

from tests.support.consumer import (
    PARTITIONS,
    Recorder,
    create_stream,
    ids_where,
    make_consumer,
    publish,
    running,
    wait_for,
)


async def test_malformed_messages_are_dead_lettered_without_blocking_or_crashing(
    nc: NatsClient, names: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    await create_stream(nc, names)
    js = nc.jetstream()
    subject = contract.subject_for(names["subject_prefix"], "patient", "x", PARTITIONS)
    [neighbour] = ids_where("y", True, contract.partition_of("x", PARTITIONS), 1)
    entity = {contract.HEADER_ENTITY_TYPE: "patient", contract.HEADER_ENTITY_ID: "x"}
    await publish(nc, names, [("x", 1, b"ok")])
    await js.publish(subject, b"no sequence", headers=entity)
    await js.publish(subject, b"bad", headers={**entity, contract.HEADER_ENTITY_SEQUENCE: "abc"})
    await js.publish(subject, b"zero", headers={**entity, contract.HEADER_ENTITY_SEQUENCE: "0"})
    await publish(nc, names, [("x", 2, b"ok"), (neighbour, 1, b"ok")])
    handler = Recorder()
    consumer, store = make_consumer(nc, names, tmp_path, handler, backoff=(0.05,))
    config = consumer.config

    async def dead() -> list[DeadEntry]:
        return await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix)

    async def replayed() -> bool:
        entries = await dead()
        return len(entries) == 3 and all(d.headers["Dlq-Consumer"] == "c-replay" for d in entries)

    async with running(consumer):
        await wait_for(
            lambda: handler.of("x") == [1, 2] and handler.of(neighbour) == [1],
            20,
            "x and its partition neighbour applied past the malformed messages",
        )
        entries = await dead()
        assert [(d.payload, d.key.entity_id, d.headers["Dlq-Reason"]) for d in entries] == [
            (b"no sequence", "x", f"malformed: no Entity-Sequence header on {subject}"),
            (
                b"bad",
                "x",
                f"malformed: Entity-Sequence 'abc' on {subject} is not a positive integer",
            ),
            (
                b"zero",
                "x",
                f"malformed: Entity-Sequence '0' on {subject} is not a positive integer",
            ),
        ]
        assert "Entity-Sequence" not in entries[0].headers  # original headers, nothing made up
        assert store.blocks() == []
        assert consumer.metrics.dead_lettered.labels("malformed")._value.get() == 3

        # A replay of x re-reads its subject past them: x stays applied once, the
        # malformed ones are dead-lettered again, nothing blocks, x goes on.
        assert await request_replay(js, config.dlq_subject_prefix, entries) == 1
        await wait_for(replayed, 20, "the replay to re-read x and dead-letter them again")
        reasons = [d.headers["Dlq-Reason"] for d in await dead()]
        assert all(r.startswith("replay: malformed: ") for r in reasons), reasons
        await publish(nc, names, [("x", 3, b"ok")])
        await wait_for(lambda: handler.of("x") == [1, 2, 3], 20, "x#3 applied after the replay")
    assert store.blocks() == []
    assert [r.getMessage() for r in caplog.records if "worker failed" in r.getMessage()] == []
