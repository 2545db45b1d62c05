"""Group commit on a real nats-server: events of many entities share one atomic batch and
one ack, a refused or unacknowledged batch never breaks order or doubles an event, and
where batches are not available the sidecar publishes one by one and says so."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig
from order_sidecar.core.committer import GroupCommitter
from order_sidecar.core.errors import OutcomeUnknown
from order_sidecar.core.gates import EntityGates, LockPolicy
from order_sidecar.core.leases import LeaseRegistry
from order_sidecar.core.model import Append, EntityPosition, Event, Stored
from order_sidecar.core.publisher import Publisher
from order_sidecar.jetstream.stream import EventStream
from order_sidecar.locks.nats_kv import NatsKvLockBackend
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import contract
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import StoredMessage, stream_messages
from tests.support.servers import NatsServer

DEBIAN_NATS = "/usr/sbin/nats-server"  # 2.9: no atomic batches (.ci/run installs it)


def event(entity_id: str, n: int = 0) -> Event:
    return Event("patient", entity_id, "update", f"{entity_id}:{n}".encode(), {}, f"k{n}")


async def stream_of(nats_url: str, names: dict[str, str], nc: NatsClient) -> EventStream:
    options = ServeConfig(stream=names["stream"], subject_prefix=names["subject_prefix"])
    stream = EventStream(nc, options)
    await stream.ensure_stream()
    return stream


def check_in_order(messages: Sequence[StoredMessage]) -> dict[str, list[int]]:
    """Each entity's Entity-Sequence in stream order; fails on a gap or a repeat."""
    sequences: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        sequences[message.headers[contract.HEADER_ENTITY_ID]].append(
            int(message.headers[contract.HEADER_ENTITY_SEQUENCE])
        )
    for entity, found in sequences.items():
        assert found == list(range(1, len(found) + 1)), (entity, found)
    return sequences


async def test_the_sidecar_creates_streams_for_batches_and_says_so(
    app: SidecarApp, nc: NatsClient
) -> None:
    info = await nc.jsm().stream_info(app.config.stream)
    assert info.config.allow_atomic is True
    assert app.committer is not None
    async with grpc.aio.insecure_channel(app.target) as channel:
        status = await sidecar_pb2_grpc.SidecarStub(channel).GetStatus(
            sidecar_pb2.GetStatusRequest()
        )
    assert status.publish_path == "group-commit"


async def test_concurrent_appends_of_many_entities_share_one_ack(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    committer = GroupCommitter(stream, max_batch=100, max_in_flight=2)
    entities = [f"e{n}" for n in range(250)]
    stored = await asyncio.gather(
        *(
            committer.append(stream.subject_of("patient", e), event(e), EntityPosition(0, 0))
            for e in entities
        )
    )
    # 250 appends in one turn of the loop: batches of 100, 100 and 50, three acks.
    assert committer.stats.batches == 3
    assert committer.stats.batched_events == 250
    messages = await stream_messages(nc, names["stream"])
    assert len(messages) == 250
    by_sequence = {m.stream_sequence: m for m in messages}
    for entity, item in zip(entities, stored, strict=True):
        message = by_sequence[item.stream_sequence]  # each reply names its own message
        assert message.headers[contract.HEADER_ENTITY_ID] == entity
        assert (item.sequence, item.duplicate) == (1, False)
        assert contract.HEADER_BATCH_ID in message.headers
    check_in_order(messages)


async def test_a_stale_fence_refuses_the_whole_batch_then_each_event_gets_its_own_answer(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    subject = stream.subject_of("patient", "stale")
    first = await stream.append(subject, event("stale", 1), EntityPosition(0, 0))
    committer = GroupCommitter(stream)
    # "stale" claims to follow nothing, though event 1 is there: the broker refuses it.
    appends = [("stale", EntityPosition(0, 0))] + [
        (f"ok{n}", EntityPosition(0, 0)) for n in range(20)
    ]
    results = await asyncio.gather(
        *(
            committer.append(stream.subject_of("patient", e), event(e, 2), after)
            for e, after in appends
        ),
        return_exceptions=True,
    )
    assert committer.stats.refused == 1
    assert type(results[0]).__name__ == "FencingConflict"
    assert all(isinstance(r, Stored) for r in results[1:])
    messages = await stream_messages(nc, names["stream"])
    # Nothing of the refused batch was half-stored: each good event once, "stale" once.
    assert sorted(m.headers[contract.HEADER_ENTITY_ID] for m in messages) == sorted(
        ["stale"] + [f"ok{n}" for n in range(20)]
    )
    assert messages[0].stream_sequence == first.stream_sequence
    check_in_order(messages)


async def test_a_duplicate_message_id_in_a_batch_answers_duplicate_and_stores_the_rest(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    subject = stream.subject_of("patient", "again")
    first = await stream.append(subject, event("again", 1), EntityPosition(0, 0))
    committer = GroupCommitter(stream)
    # A retry of event 1 with its key (the caller lost our reply), beside new events.
    results = await asyncio.gather(
        committer.append(subject, event("again", 1), EntityPosition(1, first.stream_sequence)),
        *(
            committer.append(
                stream.subject_of("patient", f"n{n}"), event(f"n{n}"), EntityPosition(0, 0)
            )
            for n in range(10)
        ),
    )
    assert committer.stats.refused == 1  # JetStream refuses the batch whole (10201)
    assert results[0] == dataclasses.replace(first, duplicate=True)
    messages = await stream_messages(nc, names["stream"])
    assert len(messages) == 11
    check_in_order(messages)


class LosesAcks:
    """The real stream, but the commit's ack is lost: after storing, or before sending."""

    def __init__(self, stream: EventStream, *, stored: bool) -> None:
        self._stream = stream
        self._stored = stored

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    async def append_batch(self, appends: Sequence[Append]) -> list[Stored]:
        if self._stored:
            await self._stream.append_batch(appends)
        raise OutcomeUnknown("no ack (the test lost it)")


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "not-stored"])
async def test_a_lost_batch_ack_is_resolved_by_reading_the_stream(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient, stored: bool
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    committer = GroupCommitter(LosesAcks(stream, stored=stored))  # type: ignore[arg-type]
    entities = [f"u{n}" for n in range(30)]
    results = await asyncio.gather(
        *(
            committer.append(stream.subject_of("patient", e), event(e), EntityPosition(0, 0))
            for e in entities
        )
    )
    assert committer.stats.unknown == 1
    messages = await stream_messages(nc, names["stream"])
    assert len(messages) == 30  # stored once either way: read back, or appended again
    by_sequence = {m.stream_sequence: m for m in messages}
    for entity, item in zip(entities, results, strict=True):
        assert by_sequence[item.stream_sequence].headers[contract.HEADER_ENTITY_ID] == entity
        assert item.sequence == 1
    check_in_order(messages)


async def test_many_callers_through_the_sidecar_share_batches_in_order(
    app: SidecarApp, nc: NatsClient
) -> None:
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)

        async def publish(entity: int, n: int) -> sidecar_pb2.PublishResponse:
            return await stub.Publish(
                sidecar_pb2.PublishRequest(
                    entity_type="patient",
                    entity_id=f"p{entity}",
                    operation=sidecar_pb2.OPERATION_UPDATE,
                    payload=f"{entity}:{n}".encode(),
                    idempotency_key=f"k{n}",
                )
            )

        async def caller(entity: int) -> list[int]:
            return [(await publish(entity, n)).sequence for n in range(5)]

        sequences = await asyncio.gather(*(caller(e) for e in range(64)))
        status = await stub.GetStatus(sidecar_pb2.GetStatusRequest())
    assert sequences == [[1, 2, 3, 4, 5]] * 64
    assert status.batches_committed > 0
    assert status.batched_events > status.batches_committed  # more than one event per ack
    messages = await stream_messages(nc, app.config.stream)
    assert len(messages) == 320
    assert all(len(found) == 5 for found in check_in_order(messages).values())


async def test_no_group_commit_publishes_one_by_one(
    serve_config: ServeConfig, nc: NatsClient
) -> None:
    app = SidecarApp(dataclasses.replace(serve_config, group_commit=False))
    await app.start()
    try:
        assert app.committer is None
        assert app.publish_path == "one-by-one (--no-group-commit)"
    finally:
        await app.stop()


async def test_a_stream_without_allow_atomic_is_published_one_by_one(
    serve_config: ServeConfig, nc: NatsClient
) -> None:
    await nc.jsm().add_stream(
        StreamConfig(
            name=serve_config.stream,
            subjects=[f"{serve_config.subject_prefix}.>"],
            allow_direct=True,
            duplicate_window=serve_config.duplicate_window,
        )
    )
    app = SidecarApp(serve_config)
    await app.start()
    try:
        assert app.committer is None
        assert app.publish_path.startswith("one-by-one")
    finally:
        await app.stop()


@pytest.mark.skipif(not Path(DEBIAN_NATS).exists(), reason="Debian's nats-server 2.9 missing")
async def test_a_server_before_2_12_is_published_one_by_one(
    serve_config: ServeConfig, tmp_path: Path
) -> None:
    """On 2.9 a "batch" would be stored message by message, so it is never sent."""
    assert shutil.which(DEBIAN_NATS)
    old = NatsServer(tmp_path, "nats-2.9", binary=DEBIAN_NATS)
    old.start()
    try:
        config = dataclasses.replace(serve_config, nats_url=old.url, lock_backend="nats-kv")
        app = SidecarApp(config)
        await app.start()
        try:
            assert app.committer is None
            assert app.publisher is not None
            stored = await app.publisher.publish(event("old", 1))
            assert stored.sequence == 1
        finally:
            await app.stop()
    finally:
        old.kill()


async def publisher_on(
    stream: EventStream, nc: NatsClient, names: dict[str, str], committer: GroupCommitter
) -> Publisher:
    """A Publisher with NATS KV locks around *committer* (the app's wiring, in small)."""
    locks = await NatsKvLockBackend.open(nc, names["lock_bucket"], 1, lock_ttl=5.0)
    # Locks linger, as by default: the gate keeps the entity's position between calls.
    policy = LockPolicy(ttl=5.0, wait=2.0, reject_when_unavailable=False, linger=1.0)
    gates = EntityGates(locks, policy)
    leases = LeaseRegistry(locks, stream, names["stream"])
    return Publisher(stream, gates, leases, names["stream"], 20, committer=committer)


async def test_a_hot_entitys_queued_calls_ride_one_chain(app: SidecarApp, nc: NatsClient) -> None:
    """64 callers of one entity: the gate's holder takes the others' events along."""
    assert app.publisher is not None and app.committer is not None
    stored = await asyncio.gather(*(app.publisher.publish(event("hot", n)) for n in range(64)))
    assert sorted(s.sequence for s in stored) == list(range(1, 65))
    assert app.committer.stats.batched_events >= 32  # most of them went in chains
    messages = await stream_messages(nc, app.config.stream)
    assert check_in_order(messages) == {"hot": list(range(1, 65))}
    by_sequence = {m.stream_sequence: m for m in messages}
    for n, item in enumerate(stored):
        assert by_sequence[item.stream_sequence].payload == f"hot:{n}".encode()


async def test_a_stale_chain_falls_back_and_continues_after_the_foreign_event(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    publisher = await publisher_on(stream, nc, names, GroupCommitter(stream))
    await publisher.publish_in_order([event("x", 1)])
    # Another producer writes x (as if our lock had expired): our position is stale.
    subject = stream.subject_of("patient", "x")
    position = await stream.position(subject)
    await stream.append(subject, event("x", 2), position)
    results = await publisher.publish_in_order([event("x", n) for n in range(3, 13)])
    assert [r.sequence for r in results if isinstance(r, Stored)] == list(range(3, 13))
    assert publisher.stats.fenced + publisher.stats.stale_guesses >= 1
    assert check_in_order(await stream_messages(nc, names["stream"])) == {"x": list(range(1, 13))}


async def test_a_retried_event_in_a_chain_is_answered_as_a_duplicate(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    publisher = await publisher_on(stream, nc, names, GroupCommitter(stream))
    (first,) = await publisher.publish_in_order([event("d", 1)])
    results = await publisher.publish_in_order([event("d", 1), event("d", 2), event("d", 3)])
    assert isinstance(first, Stored)
    assert results[0] == dataclasses.replace(first, duplicate=True)
    assert [r.sequence for r in results[1:] if isinstance(r, Stored)] == [2, 3]
    assert check_in_order(await stream_messages(nc, names["stream"])) == {"d": [1, 2, 3]}


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "not-stored"])
async def test_a_chain_whose_ack_was_lost_is_settled_by_message_ids(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient, stored: bool
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    committer = GroupCommitter(LosesAcks(stream, stored=stored))  # type: ignore[arg-type]
    publisher = await publisher_on(stream, nc, names, committer)
    results = await publisher.publish_in_order([event("l", n) for n in range(1, 6)])
    assert committer.stats.unknown == 1
    assert [r.sequence for r in results if isinstance(r, Stored)] == [1, 2, 3, 4, 5]
    # Found by message id when the lost batch had landed; appended once when it had not.
    assert all(isinstance(r, Stored) and r.duplicate == stored for r in results)
    messages = await stream_messages(nc, names["stream"])
    assert check_in_order(messages) == {"l": [1, 2, 3, 4, 5]}


async def test_concurrent_reads_of_many_entities_share_one_request(
    nats_server: NatsServer, names: dict[str, str], nc: NatsClient
) -> None:
    stream = await stream_of(nats_server.url, names, nc)
    committer = GroupCommitter(stream)
    written = [f"w{n}" for n in range(200)]
    stored = await asyncio.gather(
        *(
            committer.append(stream.subject_of("patient", e), event(e), EntityPosition(0, 0))
            for e in written
        )
    )
    unwritten = [f"none{n}" for n in range(100)]
    positions = await asyncio.gather(
        *(stream.position(stream.subject_of("patient", e)) for e in written + unwritten)
    )
    assert stream.bulk_reads[0] >= 1  # batched gets answered them, not one read each
    for item, position in zip(stored, positions, strict=False):
        assert (position.sequence, position.stream_sequence) == (1, item.stream_sequence)
    assert positions[200:] == [EntityPosition(0, 0)] * 100
