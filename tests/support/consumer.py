"""Helpers of the consumer tests: a stream in the sidecar's format, replica processes,
and the apply-order check (the project's OrderChecker over the replica's apply log)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig
from order_sidecar.jetstream.verify import OrderChecker, TypeReport
from order_sidecar_client import contract
from order_sidecar_client.consumer import (
    ConsumerConfig,
    EntityEvent,
    Handler,
    OrderedConsumer,
    SqlitePositionStore,
    StaticAssignment,
)

from tests.support.servers import ManagedProcess

REPLICA = Path(__file__).with_name("replica_proc.py")
PARTITIONS = 4


async def create_stream(
    nc: NatsClient, names: dict[str, str], partitions: int = PARTITIONS
) -> None:
    """The stream as a sidecar would create it (subjects and metadata)."""
    await nc.jetstream().add_stream(
        StreamConfig(
            name=names["stream"],
            subjects=[f"{names['subject_prefix']}.>"],
            storage=StorageType.FILE,
            metadata={
                "ordersidecar.subject_prefix": names["subject_prefix"],
                "ordersidecar.partitions": str(partitions),
            },
        )
    )


async def publish(
    nc: NatsClient,
    names: dict[str, str],
    events: Iterable[tuple[str, int, bytes]],
    entity_type: str = "patient",
    partitions: int = PARTITIONS,
) -> None:
    """Publish ``(entity_id, sequence, payload)`` straight to the stream, as given (so
    tests can write duplicates and gaps the sidecar never would)."""
    js = nc.jetstream()
    for entity_id, sequence, payload in events:
        subject = contract.subject_for(names["subject_prefix"], entity_type, entity_id, partitions)
        headers = {
            contract.HEADER_ENTITY_TYPE: entity_type,
            contract.HEADER_ENTITY_ID: entity_id,
            contract.HEADER_ENTITY_SEQUENCE: str(sequence),
            contract.HEADER_ENTITY_OPERATION: "update",
        }
        await js.publish(subject, payload, headers=headers)


def in_order(entities: dict[str, int]) -> list[tuple[str, int, bytes]]:
    """Events 1..n of each entity, interleaved round-robin."""
    out: list[tuple[str, int, bytes]] = []
    for sequence in range(1, max(entities.values()) + 1):
        out.extend(
            (entity_id, sequence, f"{entity_id}#{sequence}".encode())
            for entity_id, last in entities.items()
            if sequence <= last
        )
    return out


def ids_where(
    prefix: str, wanted: bool, partition: int, count: int, partitions: int = PARTITIONS
) -> list[str]:
    """The first *count* ids ``{prefix}{n}`` in (``wanted``) or out of *partition*."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        entity_id = f"{prefix}{n}"
        if (contract.partition_of(entity_id, partitions) == partition) is wanted:
            found.append(entity_id)
        n += 1
    return found


class ReplicaProcess(ManagedProcess):
    """``tests/support/replica_proc.py`` (the SQLite example with fault injection)."""

    def __init__(self, workdir: Path, name: str, options: dict[str, str]) -> None:
        super().__init__(name, workdir)
        self.options = options

    def _command(self) -> list[str]:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in self.options.items()]
        return [sys.executable, str(REPLICA), f"--replica-id={self.name}", *flags]

    def is_ready(self) -> bool:
        """It printed that it is starting (consuming is checked through the database)."""
        return self.log_path.exists() and "starting" in self.log_path.read_text()

    def exit_code(self, timeout: float) -> int:
        """Wait for the process to end by itself."""
        assert self.process is not None
        return int(self.process.wait(timeout))


def apply_log(db: Path) -> list[tuple[str, str, int]]:
    """``(entity_type, entity_id, sequence)`` in apply (commit) order."""
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            rows = conn.execute(
                "SELECT entity_type, entity_id, sequence FROM apply_log ORDER BY id"
            ).fetchall()
        except sqlite3.OperationalError:
            return []  # tables not created yet
    return [(str(t), str(i), int(s)) for t, i, s in rows]


def commit_sizes(db: Path) -> list[int]:
    """Events applied per committed transaction of replica processes, in commit order."""
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute("SELECT events FROM commit_log ORDER BY id").fetchall()
    return [int(r[0]) for r in rows]


def replica_rows(db: Path) -> dict[str, int]:
    """Entity id -> sequence of its row in the replica."""
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute("SELECT entity_id, sequence FROM entities").fetchall()
    return {str(i): int(s) for i, s in rows}


def check_applies(applies: Iterable[tuple[str, str, int]]) -> TypeReport:
    """Gaps, duplicates and inversions of the applies, in apply order, all types summed."""
    checker = OrderChecker()
    for entity_type, entity_id, sequence in applies:
        checker.observe_sequence(entity_type, entity_id, sequence)
    total = TypeReport()
    for report in checker.report().values():
        for name in ("events", "entities", "gaps", "duplicates", "inversions"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
    return total


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str
) -> None:
    """Poll *condition* (sync or async) until true; fail with *what* after *timeout* s."""
    deadline = time.monotonic() + timeout
    while not await _holds(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _holds(condition: Callable[[], Awaitable[bool] | bool]) -> bool:
    result = condition()
    return bool(await result) if inspect.isawaitable(result) else bool(result)


class Recorder:
    """A handler that records applies (in commit order) and can fail on a payload.

    Each apply is written through the transaction it is given, into ``recorder_log`` of
    the store's database, and ``applied`` reads that table on a connection of its own:
    so it lists what was committed, not calls whose transaction was rolled back (a batch
    rolls back when one of its events fails, and applies the events before it again).
    """

    def __init__(self) -> None:
        self.poison: bytes | None = None
        self.calls = 0
        self._db: str | None = None

    async def __call__(self, event: EntityEvent, tx: sqlite3.Connection) -> None:
        self.calls += 1
        if self._db is None:
            self._db = str(tx.execute("PRAGMA database_list").fetchone()[2])
        # Created inside the transaction: if it rolls back, so does the table.
        tx.execute(
            "CREATE TABLE IF NOT EXISTS recorder_log (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " entity_id TEXT NOT NULL, sequence INTEGER NOT NULL)"
        )
        tx.execute(
            "INSERT INTO recorder_log (entity_id, sequence) VALUES (?, ?)",
            (event.key.entity_id, event.sequence),
        )
        if self.poison is not None and event.payload == self.poison:
            raise RuntimeError("cannot apply this payload")  # after a write: rolled back

    @property
    def applied(self) -> list[tuple[str, int]]:
        """``(entity_id, sequence)`` of the committed applies, in commit order."""
        if self._db is None:
            return []
        with contextlib.closing(sqlite3.connect(self._db, timeout=30)) as conn:
            try:
                rows = conn.execute(
                    "SELECT entity_id, sequence FROM recorder_log ORDER BY id"
                ).fetchall()
            except sqlite3.OperationalError:
                return []  # nothing committed yet
        return [(str(e), int(s)) for e, s in rows]

    def of(self, entity_id: str) -> list[int]:
        return [s for e, s in self.applied if e == entity_id]


@contextlib.asynccontextmanager
async def running(
    consumer: OrderedConsumer[sqlite3.Connection],
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


def make_consumer(
    nc: NatsClient,
    names: dict[str, str],
    tmp_path: Path,
    handler: Handler[sqlite3.Connection],
    **settings: object,
) -> tuple[OrderedConsumer[sqlite3.Connection], SqlitePositionStore]:
    store = SqlitePositionStore(tmp_path / "positions.db")
    config = ConsumerConfig(stream=names["stream"], name="c", **settings)  # type: ignore[arg-type]
    return OrderedConsumer(nc, config, store, handler, StaticAssignment(1, 0)), store
