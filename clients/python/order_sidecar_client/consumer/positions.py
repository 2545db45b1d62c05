"""Where each entity's applied position lives: the user's own store.

The consumer reads ``applied`` and writes ``set_applied`` inside the same transaction
the handler writes its data in, so data and position commit together: a crash either
keeps both or neither, and a redelivery is recognised as already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from order_sidecar_client.consumer.event import EntityKey

TxT = TypeVar("TxT")


@dataclass(frozen=True)
class Block:
    """An entity stopped at ``sequence`` because that event went to the DLQ."""

    key: EntityKey
    sequence: int
    reason: str


class PositionStore(Protocol[TxT]):
    """Applied positions and blocks per entity, in the user's store.

    ``transaction`` yields the handle the handler writes with (a connection, a
    session); everything done through it commits at once when the block exits
    normally and rolls back when it raises.
    """

    def transaction(self) -> contextlib.AbstractAsyncContextManager[TxT]:
        """A transaction; commit on normal exit, roll back on an exception."""
        ...

    async def applied(self, tx: TxT, key: EntityKey) -> int:
        """The entity's last applied sequence, 0 if none."""
        ...

    async def set_applied(self, tx: TxT, key: EntityKey, sequence: int) -> None:
        """Record *sequence* as applied (in *tx*)."""
        ...

    async def blocked(self, tx: TxT, key: EntityKey) -> Block | None:
        """The entity's block, if it has one."""
        ...

    async def block(self, tx: TxT, block: Block) -> None:
        """Mark the entity blocked (kept if already blocked at an earlier sequence)."""
        ...

    async def unblock(self, tx: TxT, key: EntityKey) -> bool:
        """Remove the entity's block; whether there was one."""
        ...


class SqlitePositionStore:
    """Positions in a SQLite database, next to the handler's own tables.

    One connection per store; transactions are serialised in-process (``BEGIN
    IMMEDIATE``, so several processes may share the file, waiting on its lock).
    """

    def __init__(self, path: str | Path, busy_timeout: float = 30.0) -> None:
        self.path = str(path)
        self.connection = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self._lock = asyncio.Lock()
        self._create_tables()

    def _create_tables(self) -> None:
        self.connection.executescript(
            """
            CREATE TABLE IF NOT EXISTS consumer_positions (
                entity_type TEXT NOT NULL, entity_id TEXT NOT NULL,
                applied INTEGER NOT NULL, PRIMARY KEY (entity_type, entity_id));
            CREATE TABLE IF NOT EXISTS consumer_blocks (
                entity_type TEXT NOT NULL, entity_id TEXT NOT NULL,
                sequence INTEGER NOT NULL, reason TEXT NOT NULL,
                PRIMARY KEY (entity_type, entity_id));
            """
        )

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on an exception)."""
        async with self._lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield self.connection
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")

    async def applied(self, tx: sqlite3.Connection, key: EntityKey) -> int:
        """The entity's last applied sequence, 0 if none."""
        row = tx.execute(
            "SELECT applied FROM consumer_positions WHERE entity_type=? AND entity_id=?",
            (key.entity_type, key.entity_id),
        ).fetchone()
        return int(row[0]) if row else 0

    async def set_applied(self, tx: sqlite3.Connection, key: EntityKey, sequence: int) -> None:
        """Record *sequence* as the entity's applied position."""
        tx.execute(
            "INSERT INTO consumer_positions VALUES (?, ?, ?) ON CONFLICT DO UPDATE "
            "SET applied=excluded.applied",
            (key.entity_type, key.entity_id, sequence),
        )

    async def blocked(self, tx: sqlite3.Connection, key: EntityKey) -> Block | None:
        """The entity's block, if any."""
        row = tx.execute(
            "SELECT sequence, reason FROM consumer_blocks WHERE entity_type=? AND entity_id=?",
            (key.entity_type, key.entity_id),
        ).fetchone()
        return Block(key, int(row[0]), str(row[1])) if row else None

    async def block(self, tx: sqlite3.Connection, block: Block) -> None:
        """Mark the entity blocked; an existing block keeps its first sequence."""
        tx.execute(
            "INSERT INTO consumer_blocks VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (block.key.entity_type, block.key.entity_id, block.sequence, block.reason),
        )

    async def unblock(self, tx: sqlite3.Connection, key: EntityKey) -> bool:
        """Remove the entity's block."""
        cursor = tx.execute(
            "DELETE FROM consumer_blocks WHERE entity_type=? AND entity_id=?",
            (key.entity_type, key.entity_id),
        )
        return cursor.rowcount > 0

    def blocks(self) -> list[Block]:
        """Every blocked entity (for operators and tests)."""
        rows = self.connection.execute(
            "SELECT entity_type, entity_id, sequence, reason FROM consumer_blocks ORDER BY 1, 2"
        ).fetchall()
        return [Block(EntityKey(r[0], r[1]), int(r[2]), str(r[3])) for r in rows]

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()
