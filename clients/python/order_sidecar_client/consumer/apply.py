"""Apply-once per entity: the decision every event goes through, fetched or re-read.

In one transaction of the user's store: an event at or below the applied position is
skipped; the next one is handed to the handler and the position moves with its writes;
anything further is a gap; a blocked entity applies nothing. The store's check is what
keeps order even if two replicas briefly hold one event (a lease is only an optimisation).

A batch (a partition's fetched events, in stream order) goes through the same decision
event by event inside one transaction, and stops at the first event it cannot apply: a
gap or a blocked entity ends the batch before that event (nothing of it was written);
a handler failure rolls the whole transaction back, and the events before the failing
one are applied again in a new transaction, so the caller gets a committed prefix and
the one event to deal with.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic

from prometheus_client import CollectorRegistry, Counter, Gauge

from order_sidecar_client.consumer.event import EntityEvent, EntityKey
from order_sidecar_client.consumer.positions import Block, PositionStore, TxT

log = logging.getLogger(__name__)

Handler = Callable[[EntityEvent, TxT], Awaitable[None]]


class Outcome(enum.Enum):
    """What became of one delivery."""

    APPLIED = "applied"
    SKIPPED = "skipped"
    BLOCKED = "blocked"
    GAP = "gap"


@dataclass(frozen=True)
class Decision:
    """The outcome and the entity's applied position when it was taken."""

    outcome: Outcome
    applied: int


@dataclass(frozen=True)
class BatchResult:
    """What became of a batch: ``decisions`` of its committed prefix (applied or skipped,
    one per event, in order); then, for the event right after it, at most one of ``stop``
    (its gap or blocked decision; nothing written) or ``error`` (its handler's failure;
    its writes rolled back). Neither means the batch ended early (time or lease) or
    went through whole."""

    decisions: tuple[Decision, ...]
    stop: Decision | None = None
    error: Exception | None = None


class _EventFailed(Exception):
    """The event at *index* of a batch raised (the transaction is rolled back)."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class _InTransaction(Generic[TxT]):
    """What one transaction has learnt about its entities, so a batch with several
    events of an entity reads its position and block once: positions it read or moved,
    entities it found unblocked. Moved positions are written once per entity, by
    :meth:`write_positions`, inside the same transaction before the commit."""

    def __init__(self, store: PositionStore[TxT], tx: TxT) -> None:
        self.store = store
        self.tx = tx
        self._applied: dict[EntityKey, int] = {}
        self._unblocked: set[EntityKey] = set()
        self._moved: dict[EntityKey, int] = {}

    async def applied(self, key: EntityKey) -> int:
        """The entity's position as this transaction sees it."""
        if key not in self._applied:
            self._applied[key] = await self.store.applied(self.tx, key)
        return self._applied[key]

    async def blocked(self, key: EntityKey) -> bool:
        """Whether the entity is blocked (nothing in the transaction blocks one)."""
        if key in self._unblocked:
            return False
        if await self.store.blocked(self.tx, key) is not None:
            return True
        self._unblocked.add(key)
        return False

    def move(self, key: EntityKey, sequence: int) -> None:
        """The entity's event *sequence* was applied in this transaction."""
        self._applied[key] = self._moved[key] = sequence

    async def write_positions(self) -> None:
        """Store every moved position (before the commit, in the transaction)."""
        for key, sequence in self._moved.items():
            await self.store.set_applied(self.tx, key, sequence)


class ConsumerMetrics:
    """Prometheus metrics of one consumer replica (``ordersidecar_consumer_*``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.events = Counter(
            "ordersidecar_consumer_events_total",
            "Deliveries by outcome: applied, skipped, blocked, gap, failed.",
            ["outcome"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "ordersidecar_consumer_dead_lettered_total",
            "Events sent to the dead-letter stream, by cause.",
            ["cause"],
            registry=registry,
        )
        self.partitions_held = Gauge(
            "ordersidecar_consumer_partitions_held",
            "Partitions this replica processes now.",
            registry=registry,
        )

    def count(self, outcome: str, deliveries: int = 1) -> None:
        """*deliveries* deliveries (one by default) with *outcome*."""
        self.events.labels(outcome).inc(deliveries)


class Applier(Generic[TxT]):
    """Runs the user's handler for the next event of an entity, once."""

    def __init__(self, store: PositionStore[TxT], handler: Handler[TxT]) -> None:
        self.store = store
        self.handler = handler

    async def apply(self, event: EntityEvent) -> Decision:
        """Decide, and apply if it is the entity's next event; handler errors propagate."""
        async with self.store.transaction() as tx:
            state = _InTransaction(self.store, tx)
            decision = await self._step(state, event)
            await state.write_positions()
        return decision

    async def apply_batch(
        self, events: Sequence[EntityEvent], may_go_on: Callable[[], bool], max_seconds: float
    ) -> BatchResult:
        """Apply *events* (in order) in one transaction, up to the first one that cannot be.

        Before each event *may_go_on* must hold (the lease), and after the first the
        transaction must have been open less than *max_seconds*; otherwise it commits
        what it has. A failure of the store itself (the commit) counts as the first
        event's, like :meth:`apply`'s.
        """
        limit = len(events)
        error: Exception | None = None
        while True:
            try:
                decisions, stop = await self._one_transaction(
                    events[:limit], may_go_on, max_seconds
                )
            except _EventFailed as failed:
                if failed.index == 0:
                    return BatchResult((), error=failed.error)
                # Roll back everything, then apply the events before the failing one
                # again: the prefix commits, the failing one is the caller's to handle.
                limit, error = failed.index, failed.error
                continue
            except Exception as failure:  # the commit failed: nothing of the batch holds
                return BatchResult((), error=failure)
            if len(decisions) < limit:
                error = None  # the prefix ended early: the failing event comes round again
            return BatchResult(tuple(decisions), stop, error)

    async def _one_transaction(
        self, events: Sequence[EntityEvent], may_go_on: Callable[[], bool], max_seconds: float
    ) -> tuple[list[Decision], Decision | None]:
        decisions: list[Decision] = []
        stop: Decision | None = None
        if not events or not may_go_on():
            return decisions, None
        async with self.store.transaction() as tx:
            state = _InTransaction(self.store, tx)
            opened = time.monotonic()
            for index, event in enumerate(events):
                if index and (time.monotonic() - opened >= max_seconds or not may_go_on()):
                    break
                try:
                    decision = await self._step(state, event)
                except Exception as error:
                    raise _EventFailed(index, error) from error
                if decision.outcome in (Outcome.BLOCKED, Outcome.GAP):
                    stop = decision  # nothing written for it: commit the prefix
                    break
                decisions.append(decision)
            await state.write_positions()
        return decisions, stop

    async def _step(self, state: _InTransaction[TxT], event: EntityEvent) -> Decision:
        """One event's decision inside the transaction; the handler runs only for
        ``applied + 1``."""
        key = event.key
        applied = await state.applied(key)
        if event.sequence <= applied:
            return Decision(Outcome.SKIPPED, applied)
        if await state.blocked(key):
            return Decision(Outcome.BLOCKED, applied)
        if event.sequence > applied + 1:
            return Decision(Outcome.GAP, applied)
        await self.handler(event, state.tx)
        state.move(key, event.sequence)
        return Decision(Outcome.APPLIED, event.sequence)

    async def block(self, event: EntityEvent, reason: str) -> None:
        """Mark the event's entity blocked at its sequence."""
        async with self.store.transaction() as tx:
            await self.store.block(tx, Block(event.key, event.sequence, reason))
        log.error(
            "entity %s/%s blocked at sequence %d: %s",
            event.key.entity_type,
            event.key.entity_id,
            event.sequence,
            reason,
        )
