"""A consumer replica process for tests: the SQLite example plus fault injection.

``--crash-in-handler N``: SIGKILL itself inside the N-th handler call (nothing
committed). ``--crash-after-commit N``: SIGKILL itself right after the N-th commit,
before the ack. On a clean stop it prints ``OUTCOMES {json}`` (delivery outcomes).
Every transaction that applied events records in ``commit_log`` how many (in that
same transaction), so tests can see the batches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator

from order_sidecar_client.consumer import EntityEvent, SqlitePositionStore
from order_sidecar_client.examples import replicate_sqlite


class FaultyHandler(replicate_sqlite.ReplicaHandler):
    """The example's handler that can crash the process inside the N-th call."""

    def __init__(self, replica: str, crash_in_handler: int) -> None:
        super().__init__(replica)
        self.calls = 0
        self.crash_in_handler = crash_in_handler

    async def __call__(self, event: EntityEvent, tx: sqlite3.Connection) -> None:
        await super().__call__(event, tx)
        self.calls += 1
        CrashAfterCommitStore.handled += 1
        if self.calls == self.crash_in_handler:
            os.kill(os.getpid(), signal.SIGKILL)


class CrashAfterCommitStore(SqlitePositionStore):
    """Kills the process right after its N-th commit, before the consumer acks."""

    crash_after: int = 0
    commits: int = 0
    handled: int = 0  # handler calls so far (FaultyHandler counts them)
    replica: str = ""

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[sqlite3.Connection]:
        async with super().transaction() as tx:
            before, handled = tx.total_changes, CrashAfterCommitStore.handled
            yield tx
            if CrashAfterCommitStore.handled > handled:
                events = CrashAfterCommitStore.handled - handled
                tx.execute(
                    "INSERT INTO commit_log (replica, events) VALUES (?, ?)",
                    (self.replica, events),
                )
            wrote = tx.total_changes > before
        if wrote:
            self.commits += 1
            if self.commits == self.crash_after:
                os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-in-handler", type=int, default=0)
    parser.add_argument("--crash-after-commit", type=int, default=0)
    own, rest = parser.parse_known_args()
    args = replicate_sqlite.parse_args(rest)
    CrashAfterCommitStore.crash_after = own.crash_after_commit
    CrashAfterCommitStore.replica = args.replica_id
    store = replicate_sqlite.open_store(args.db, CrashAfterCommitStore)
    store.connection.execute(
        "CREATE TABLE IF NOT EXISTS commit_log (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " replica TEXT NOT NULL, events INTEGER NOT NULL)"
    )
    handler = FaultyHandler(args.replica_id, own.crash_in_handler)
    logging.basicConfig(level="INFO", format=f"%(asctime)s {args.replica_id} %(message)s")
    print("starting", flush=True)
    metrics = asyncio.run(replicate_sqlite.run(args, handler, store))
    counts = {
        sample.labels["outcome"]: sample.value
        for metric in metrics.events.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    print("OUTCOMES " + json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
