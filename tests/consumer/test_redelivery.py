"""A replica that crashes before its ack: the event is redelivered and applied once.

Replica A is SIGKILLed right after committing an apply but before acking it, so the
broker redelivers an event already applied (it must be skipped). Replica B is
SIGKILLed inside its handler, before committing, so the broker redelivers an event
not applied (it must be applied). Replica C then finishes the stream.

The replicas apply one event per transaction (``batch_size`` 1), so the counts below
are events; ``test_batches.py`` crashes replicas the same way in the middle of batches.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from nats.aio.client import Client as NatsClient

from tests.support.consumer import (
    ReplicaProcess,
    apply_log,
    check_applies,
    create_stream,
    in_order,
    publish,
    replica_rows,
    wait_for,
)
from tests.support.servers import NatsServer

ENTITIES = {f"e{n}": 10 for n in range(6)}


async def test_crashes_before_ack_are_redelivered_and_applied_once(
    nc: NatsClient, names: dict[str, str], nats_server: NatsServer, tmp_path: Path
) -> None:
    await create_stream(nc, names)
    await publish(nc, names, in_order(ENTITIES))
    db = tmp_path / "replica.db"
    options = {
        "nats_url": nats_server.url,
        "stream": names["stream"],
        "db": str(db),
        "ack_wait": "1",
        "batch_size": "1",
    }
    a = ReplicaProcess(tmp_path, "a", {**options, "crash_after_commit": "5"})
    b = ReplicaProcess(tmp_path, "b", {**options, "crash_in_handler": "7"})
    c = ReplicaProcess(tmp_path, "c", options)
    started = [a]
    try:
        a.start()
        assert a.exit_code(60) == -signal.SIGKILL
        assert len(apply_log(db)) == 5
        started.append(b)
        b.start()
        assert b.exit_code(60) == -signal.SIGKILL
        assert len(apply_log(db)) == 5 + 6  # the 7th call died before its commit
        started.append(c)
        c.start()
        await wait_for(lambda: replica_rows(db) == ENTITIES, 60, "the replica to catch up")
        assert c.terminate() == 0
    finally:
        for replica in started:
            replica.kill()
    report = check_applies(apply_log(db))
    assert (report.gaps, report.duplicates, report.inversions) == (0, 0, 0)
    assert report.events == sum(ENTITIES.values())
    outcomes = json.loads(c.log_path.read_text().split("OUTCOMES ", 1)[1].splitlines()[0])
    # B skipped A's committed-but-unacked event (no duplicate above); C applied the rest.
    assert outcomes["applied"] == sum(ENTITIES.values()) - 11, outcomes
