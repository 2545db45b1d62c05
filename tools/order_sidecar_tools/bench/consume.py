"""Consumer throughput: replicate a pre-filled stream into SQLite with 1 and 3 replicas.

    python -m order_sidecar_tools.bench.consume [--nats-url URL] \\
        [--events 20000] [--entities 500] [--partitions 16] [--replicas 1,3]

For each replica count it fills a fresh stream in the sidecar's wire format, starts that
many ``replicate_sqlite`` processes (static assignment, each with its own SQLite file,
so the figure is the consumer's rather than SQLite's one-writer lock) and
times from the moment every replica has applied an event (start-ups differ) to the last
apply; events/s counts the applies in that time (each one a committed transaction and an
ack). Without ``--nats-url`` it runs an embedded nats-server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig
from order_sidecar.jetstream.embedded import EmbeddedNats
from order_sidecar_client import contract


@dataclass(frozen=True)
class Row:
    """One measured run."""

    replicas: int
    events: int
    seconds: float
    timed: int = 0
    """Applies inside *seconds* (0: all *events*); the others came before the clock."""

    @property
    def rate(self) -> float:
        """Applied events per second."""
        return (self.timed or self.events) / self.seconds if self.seconds else 0.0


async def fill(nc: NatsClient, stream: str, events: int, entities: int, partitions: int) -> None:
    """A fresh stream with *events* spread round-robin over *entities*, in order."""
    prefix = stream.lower()
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[f"{prefix}.>"],
            storage=StorageType.FILE,
            metadata={
                "ordersidecar.subject_prefix": prefix,
                "ordersidecar.partitions": str(partitions),
            },
        )
    )
    pending = []
    for n in range(events):
        entity_id, sequence = f"e{n % entities}", n // entities + 1
        headers = {
            contract.HEADER_ENTITY_TYPE: "patient",
            contract.HEADER_ENTITY_ID: entity_id,
            contract.HEADER_ENTITY_SEQUENCE: str(sequence),
            contract.HEADER_ENTITY_OPERATION: "update",
        }
        subject = contract.subject_for(prefix, "patient", entity_id, partitions)
        pending.append(js.publish(subject, b'{"name": "Ada"}', headers=headers))
        if len(pending) == 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


def applied(dbs: list[Path]) -> int:
    """Rows in the replicas' apply logs."""
    return sum(_applied(db) for db in dbs)


def _applied(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM apply_log").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


async def measure(url: str, nc: NatsClient, args: argparse.Namespace, replicas: int) -> Row:
    """Fill a stream, run *replicas* processes until everything is applied."""
    stream = f"BENCH_{uuid.uuid4().hex[:8].upper()}"
    await fill(nc, stream, args.events, args.entities, args.partitions)
    try:
        return await replicate(url, stream, args.events, replicas, give_up_after=args.timeout)
    finally:
        await nc.jetstream().delete_stream(stream)


async def replicate(
    url: str,
    stream: str,
    events: int,
    replicas: int,
    *,
    name: str = "replicate",
    give_up_after: float = 600.0,
    workdir: Path | None = None,
) -> Row:
    """Run *replicas* ``replicate_sqlite`` processes (consumer *name*, static assignment,
    a SQLite file each in *workdir*) over *stream* until *events* are applied (or
    TimeoutError after *give_up_after* seconds); timed from the moment every replica has
    applied an event to the last apply."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="consume-bench-"))
    dbs = [workdir / f"{name}-replica-{i}.db" for i in range(replicas)]
    command = [sys.executable, "-m", "order_sidecar_client.examples.replicate_sqlite"]
    command += [f"--nats-url={url}", f"--stream={stream}", f"--name={name}"]
    processes = [
        await asyncio.create_subprocess_exec(
            *command,
            "--log-level=WARNING",
            f"--db={db}",
            f"--replicas={replicas}",
            f"--replica-index={i}",
        )
        for i, db in enumerate(dbs)
    ]
    try:
        seconds, timed = await _time_applies(dbs, events, give_up_after)
        return Row(replicas, events, seconds, timed)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), 20)


async def _time_applies(dbs: list[Path], events: int, limit: float) -> tuple[float, int]:
    """Seconds from the moment every replica has applied (their start-ups differ) to the
    last apply, and the applies in that time."""
    deadline = time.monotonic() + limit
    while not all(_applied(db) for db in dbs):  # the clock starts once every one applies
        if applied(dbs) >= events:
            break  # a replica with nothing to apply: time from the first apply instead
        if time.monotonic() > deadline:
            raise TimeoutError(f"{applied(dbs)} of {events} applied after {limit}s")
        await asyncio.sleep(0.01)
    started, before = time.monotonic(), applied(dbs)
    if before >= events:
        before = 0
    while (count := applied(dbs)) < events:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} of {events} applied after {limit}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started, events - before


def format_rows(rows: list[Row], args: argparse.Namespace) -> str:
    """A table, one row per replica count."""
    lines = [
        f"{args.events} events, {args.entities} entities, {args.partitions} partitions",
        f"{'replicas':>8}  {'seconds':>8}  {'events/s':>9}",
    ]
    lines += [f"{r.replicas:>8}  {r.seconds:>8.2f}  {r.rate:>9.0f}" for r in rows]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[Row]:
    """Run every replica count on one server."""
    embedded = None if args.nats_url else EmbeddedNats(Path(tempfile.mkdtemp(prefix="bench-nats-")))
    url = args.nats_url or await embedded.start()  # type: ignore[union-attr]
    nc = await nats.connect(url)
    try:
        return [await measure(url, nc, args, int(n)) for n in args.replicas.split(",")]
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5.0)
        if embedded is not None:
            embedded.stop()


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description="consumer throughput with 1 and 3 replicas")
    parser.add_argument("--nats-url", default="")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--entities", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--replicas", default="1,3")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    print(format_rows(asyncio.run(main_async(args)), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
