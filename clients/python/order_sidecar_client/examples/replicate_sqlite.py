"""Replicate entities from a sidecar stream into SQLite, once and in order per entity.

    python -m order_sidecar_client.examples.replicate_sqlite \\
        --nats-url nats://127.0.0.1:4222 --stream ENTITY_EVENTS --db replica.db \\
        [--replicas 3 --replica-index 0 | --assignment kv] [--batch-size 256]

Each event upserts (or deletes) the entity's row and appends to ``apply_log`` in the
same transaction that moves the entity's applied position. Several replicas may share
the database file; with ``--assignment kv`` they split the partitions through JetStream
KV leases and rebalance as replicas come and go. SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence

import nats
from nats.aio.client import Client as NatsClient

from order_sidecar_client.consumer import (
    Assignment,
    BlockedPolicy,
    ConsumerConfig,
    ConsumerConfigError,
    ConsumerMetrics,
    EntityEvent,
    GapPolicy,
    KvLeaseAssignment,
    LeaseConfig,
    OrderedConsumer,
    SqlitePositionStore,
    StaticAssignment,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS entities (
    entity_type TEXT NOT NULL, entity_id TEXT NOT NULL, sequence INTEGER NOT NULL,
    operation TEXT NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (entity_type, entity_id));
CREATE TABLE IF NOT EXISTS apply_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, entity_type TEXT NOT NULL, entity_id TEXT NOT NULL,
    sequence INTEGER NOT NULL, replica TEXT NOT NULL);
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The example's flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    defaults = ConsumerConfig("defaults")
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-index", type=int, default=0)
    parser.add_argument("--assignment", choices=["static", "kv"], default="static")
    parser.add_argument("--name", default="replicate", help="consumer name (durables prefix)")
    parser.add_argument("--lease-bucket", default="", help="default {stream}_LEASES_{name}")
    parser.add_argument("--lease-ttl", type=float, default=6.0)
    parser.add_argument("--replica-id", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--ack-wait", type=float, default=10.0)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--gap-policy", choices=[p.value for p in GapPolicy], default="dlq")
    parser.add_argument("--gap-wait", type=float, default=5.0)
    parser.add_argument("--blocked-policy", choices=[p.value for p in BlockedPolicy], default="dlq")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="events fetched and applied in one transaction per partition (1: one by one)",
    )
    parser.add_argument(
        "--batch-max-seconds",
        type=float,
        default=defaults.batch_max_seconds,
        help="a transaction takes no further event once open this long",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def consumer_config(args: argparse.Namespace) -> ConsumerConfig:
    """The consumer settings from the flags."""
    return ConsumerConfig(
        stream=args.stream,
        name=args.name,
        ack_wait=args.ack_wait,
        max_deliveries=args.max_deliveries,
        gap_policy=GapPolicy(args.gap_policy),
        gap_wait=args.gap_wait,
        blocked_policy=BlockedPolicy(args.blocked_policy),
        batch_size=args.batch_size,
        batch_max_seconds=args.batch_max_seconds,
    )


async def open_assignment(nc: NatsClient, args: argparse.Namespace) -> Assignment:
    """Static by index, or KV leases."""
    if args.assignment == "static":
        return StaticAssignment(args.replicas, args.replica_index)
    bucket = args.lease_bucket or f"{args.stream}_LEASES_{args.name}"
    return await KvLeaseAssignment.open(nc, LeaseConfig(bucket, args.replica_id, args.lease_ttl))


def open_store(
    path: str, store_type: type[SqlitePositionStore] = SqlitePositionStore
) -> SqlitePositionStore:
    """The position store and the replica's tables in one database."""
    store = store_type(path)
    store.connection.executescript(SCHEMA)
    return store


def make_handler(replica: str) -> ReplicaHandler:
    """The handler that writes each event into the replica tables."""
    return ReplicaHandler(replica)


class ReplicaHandler:
    """Upserts or deletes the entity's row and logs the apply, in the consumer's transaction."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def __call__(self, event: EntityEvent, tx: sqlite3.Connection) -> None:
        """Apply *event* through *tx*."""
        key = event.key
        if event.operation == "delete":
            tx.execute(
                "DELETE FROM entities WHERE entity_type=? AND entity_id=?",
                (key.entity_type, key.entity_id),
            )
        else:
            tx.execute(
                "INSERT OR REPLACE INTO entities VALUES (?, ?, ?, ?, ?)",
                (key.entity_type, key.entity_id, event.sequence, event.operation, event.payload),
            )
        tx.execute(
            "INSERT INTO apply_log (entity_type, entity_id, sequence, replica) VALUES (?, ?, ?, ?)",
            (key.entity_type, key.entity_id, event.sequence, self.replica),
        )


async def run(
    args: argparse.Namespace,
    handler: ReplicaHandler | None = None,
    store: SqlitePositionStore | None = None,
) -> ConsumerMetrics:
    """Connect, consume until a signal, close; the consumer's metrics."""
    nc = await nats.connect(args.nats_url, name=f"replicate-{args.replica_id}")
    store = store or open_store(args.db)
    consumer = OrderedConsumer(
        nc,
        consumer_config(args),
        store,
        handler or make_handler(args.replica_id),
        await open_assignment(nc, args),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(consumer.stop()))
    try:
        await consumer.run()
    finally:
        store.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5.0)
    return consumer.metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit 2 with the reason on an invalid setting."""
    args = parse_args(argv)
    try:
        consumer_config(args)
    except ConsumerConfigError as error:
        print(f"replicate_sqlite: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s {args.replica_id} %(levelname)s %(message)s"
    )
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
