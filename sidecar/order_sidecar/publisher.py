"""Ordered publishing: the algorithm that makes G1-G5 of docs/guarantees.md hold.

For each event: hold the entity's gate (local FIFO), hold its lock (fast path), read
the entity's last event from the stream unless cached, and append the next sequence
with ``Nats-Expected-Last-Subject-Sequence``. The broker refuses an append whose
expected sequence is stale, so order never depends on the lock; a refused append is
re-read (from the stream leader) and retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import wire
from .errors import Contention, EarlierEventFailed, FencingConflict, SidecarError
from .events import Event, check_size
from .gates import EntityGate, EntityGates
from .stream import EntityPosition, EventStream, Stored

log = logging.getLogger(__name__)

_CONFLICT_BACKOFF = 0.002


@dataclass
class PublishStats:
    """Counters for logs and tests (Prometheus metrics build on these)."""

    published: int = 0
    duplicates: int = 0
    fenced: int = 0


class Publisher:
    """Publishes events in per-entity order."""

    def __init__(
        self, stream: EventStream, gates: EntityGates, stream_name: str, max_attempts: int
    ) -> None:
        self._stream = stream
        self._gates = gates
        self._stream_name = stream_name
        self._max_attempts = max_attempts
        self.stats = PublishStats()

    def lock_key(self, event: Event) -> str:
        """The lock name of *event*'s entity: unique per stream, type and id."""
        return f"{self._stream_name}:{event.entity_type}:{wire.entity_token(event.entity_id)}"

    async def publish(self, event: Event, budget: float | None = None) -> Stored:
        """Publish one event; return where it is stored."""
        check_size(event, self._stream.max_payload)
        async with self._gates.hold(self.lock_key(event)) as gate:
            return await self._publish_held(gate, event, _deadline(budget))

    async def publish_in_order(
        self, events: Sequence[Event], budget: float | None = None
    ) -> list[Stored | SidecarError]:
        """Publish events of one entity in order; after a failure, skip the rest."""
        deadline = _deadline(budget)
        results: list[Stored | SidecarError] = []
        async with self._gates.hold(self.lock_key(events[0])) as gate:
            for index, event in enumerate(events):
                try:
                    check_size(event, self._stream.max_payload)
                    results.append(await self._publish_held(gate, event, deadline))
                except SidecarError as error:
                    results.append(error)
                    results.extend(_skipped(events[index + 1 :]))
                    break
        return results

    async def _publish_held(self, gate: EntityGate, event: Event, deadline: float | None) -> Stored:
        subject = self._stream.subject_for(event)
        from_leader = False
        for attempt in range(self._max_attempts):
            await self._gates.ensure_lease(gate, _remaining(deadline))
            try:
                if gate.position is None:
                    gate.position = await self._stream.position(subject, from_leader=from_leader)
                stored = await self._stream.append(subject, event, gate.position)
            except FencingConflict:
                gate.position, from_leader = None, True
                self.stats.fenced += 1
                log.info("fenced: %s moved on under us (attempt %d)", subject, attempt + 1)
                # Without a lock, rivals retry in lockstep; jitter breaks the tie.
                await asyncio.sleep(random.uniform(0, _CONFLICT_BACKOFF * (attempt + 1)))
                continue
            except BaseException:
                gate.position = None
                raise
            if stored.duplicate:
                self.stats.duplicates += 1
            else:
                self.stats.published += 1
                gate.position = EntityPosition(stored.sequence, stored.stream_sequence)
            return stored
        raise Contention(
            f"{subject} changed under {self._max_attempts} attempts in a row; retry with the "
            "same idempotency_key"
        )


def _skipped(events: Sequence[Event]) -> list[Stored | SidecarError]:
    return [
        EarlierEventFailed(
            "not published: an earlier event of this entity in the batch failed; "
            "fix it and send this one again"
        )
        for _ in events
    ]


def _deadline(budget: float | None) -> float | None:
    return None if budget is None else time.monotonic() + budget


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()
