"""A poison event reaches the DLQ after max deliveries, blocks its entity, and is
re-driven by ``order-sidecar dlq replay`` once the handler can apply it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from nats.aio.client import Client as NatsClient
from order_sidecar_client.consumer import EntityKey, list_dead

from tests.support.consumer import (
    Recorder,
    create_stream,
    make_consumer,
    publish,
    running,
    wait_for,
)


async def dlq_cli(nats_url: str, stream: str, *args: str) -> str:
    command = [sys.executable, "-m", "order_sidecar.cli", "dlq", *args]
    command += [f"--nats-url={nats_url}", f"--stream={stream}"]
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_poison_event_goes_to_the_dlq_and_replay_re_drives_it(
    nc: NatsClient, names: dict[str, str], tmp_path: Path, nats_server: object
) -> None:
    url = nats_server.url  # type: ignore[attr-defined]
    await create_stream(nc, names)
    await publish(nc, names, [("p", 1, b"ok"), ("p", 2, b"poison"), ("q", 1, b"ok")])
    await publish(nc, names, [("p", 3, b"ok"), ("q", 2, b"ok")])
    handler = Recorder()
    handler.poison = b"poison"
    consumer, store = make_consumer(nc, names, tmp_path, handler, max_deliveries=3, backoff=(0.05,))
    config = consumer.config

    async def dead_count(n: int) -> bool:
        return len(await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix)) == n

    async with running(consumer):
        await wait_for(lambda: dead_count(2), 30, "the poison event and its follower in the DLQ")
        await wait_for(lambda: handler.of("q") == [1, 2], 10, "q applied")
        assert handler.of("p") == [1]
        assert [(b.key, b.sequence) for b in store.blocks()] == [(EntityKey("patient", "p"), 2)]
        listed = [
            json.loads(line)
            for line in (await dlq_cli(url, names["stream"], "list", "--json")).splitlines()
        ]
        assert [(row["entity_id"], row["sequence"]) for row in listed] == [("p", "2"), ("p", "3")]
        assert "max deliveries (3) reached" in listed[0]["reason"]
        assert listed[0]["deliveries"] == "3"
        poison_calls = handler.calls

        # Replayed before the fix: p#2 fails again, is dead-lettered again, p stays blocked.
        await dlq_cli(url, names["stream"], "replay", "--entity-id=p")

        async def dead_again() -> bool:
            dead = await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix)
            return [d.headers["Dlq-Reason"][:7] for d in dead] == ["replay:"]

        await wait_for(dead_again, 30, "p#2 dead-lettered again by the failed replay")
        assert [(b.key.entity_id, b.sequence) for b in store.blocks()] == [("p", 2)]
        assert handler.of("p") == [1]

        handler.poison = None  # the handler is fixed
        out = await dlq_cli(url, names["stream"], "replay", "--entity-id=p")
        assert "replay requested for 1 entities (1 dead events)" in out
        await wait_for(lambda: handler.of("p") == [1, 2, 3], 30, "p re-driven")
        await wait_for(lambda: dead_count(0), 10, "the DLQ purged of p")
    assert store.blocks() == []
    assert poison_calls >= 3 + 1  # three deliveries of p#2 plus the good events
    assert "no dead events" in await dlq_cli(url, names["stream"], "list")
