"""Apply-once per entity: the decision every event goes through, fetched or re-read.

In one transaction of the user's store: an event at or below the applied position is
skipped; the next one is handed to the handler and the position moves with its writes;
anything further is a gap; a blocked entity applies nothing. The store's check is what
keeps order even if two replicas briefly hold one event (a lease is only an optimisation).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic

from prometheus_client import CollectorRegistry, Counter, Gauge

from order_sidecar_client.consumer.event import EntityEvent
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

    def count(self, outcome: str) -> None:
        """One delivery with *outcome*."""
        self.events.labels(outcome).inc()


class Applier(Generic[TxT]):
    """Runs the user's handler for the next event of an entity, once."""

    def __init__(self, store: PositionStore[TxT], handler: Handler[TxT]) -> None:
        self.store = store
        self.handler = handler

    async def apply(self, event: EntityEvent) -> Decision:
        """Decide, and apply if it is the entity's next event; handler errors propagate."""
        key = event.key
        async with self.store.transaction() as tx:
            applied = await self.store.applied(tx, key)
            if event.sequence <= applied:
                return Decision(Outcome.SKIPPED, applied)
            if await self.store.blocked(tx, key) is not None:
                return Decision(Outcome.BLOCKED, applied)
            if event.sequence > applied + 1:
                return Decision(Outcome.GAP, applied)
            await self.handler(event, tx)
            await self.store.set_applied(tx, key, event.sequence)
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
