"""Ordered publishing: the algorithm that makes G1-G5 of docs/guarantees.md hold.

For each event: hold the entity's gate (local FIFO), hold its lock (fast path), read
the entity's last event from the stream unless cached, and append the next sequence
with ``Nats-Expected-Last-Subject-Sequence``. The broker refuses an append whose
expected sequence is stale, so order never depends on the lock; a refused append is
re-read (from the stream leader) and retried.

With group commit (``core/committer.py``), appends of many entities share one atomic
batch, and the holder of a busy entity's gate takes the plain events queued behind it
into one chain: one batch, fenced once, for a whole run of the entity's events. A chain
that is refused or unacknowledged falls back to the one-by-one path above.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from order_sidecar_client import contract

from order_sidecar.core.committer import GroupCommitter
from order_sidecar.core.errors import (
    BatchRefused,
    Contention,
    EarlierEventFailed,
    FencingConflict,
    IdempotencyKeyReused,
    InvalidEvent,
    LeaseLost,
    OutcomeUnknown,
    PreconditionFailed,
    SidecarError,
    internal_error,
)
from order_sidecar.core.gates import EntityGate, EntityGates, Waiter
from order_sidecar.core.leases import LeaseRegistry
from order_sidecar.core.model import EntityPosition, Event, Stored, event_digest
from order_sidecar.core.ports import Appender, EventLog
from order_sidecar.core.validation import check_size

log = logging.getLogger(__name__)

_CONFLICT_BACKOFF = 0.002


@dataclass
class PublishStats:
    """Counters for logs and tests (Prometheus metrics build on these)."""

    published: int = 0
    duplicates: int = 0
    fenced: int = 0
    #: Appends refused because a remembered position was stale (then re-read).
    stale_guesses: int = 0


class Publisher:
    """Publishes events in per-entity order."""

    def __init__(
        self,
        stream: EventLog,
        gates: EntityGates,
        leases: LeaseRegistry,
        stream_name: str,
        max_attempts: int,
        on_fenced: Callable[[], None] = lambda: None,
        committer: GroupCommitter | None = None,
    ) -> None:
        """*committer*: group commit (atomic batches, chains); without it, one by one."""
        self._on_fenced = on_fenced
        self._committer = committer
        self._appender: Appender = committer or stream
        self.stream = stream
        self._gates = gates
        self.leases = leases
        self._stream_name = stream_name
        self._max_attempts = max_attempts
        self.stats = PublishStats()

    @property
    def gates(self) -> EntityGates:
        """The entity gates (for status and metrics)."""
        return self._gates

    def lock_key(self, event: Event) -> str:
        """The lock name of *event*'s entity: unique per stream, type and id."""
        return self.lock_key_of(event.entity_type, event.entity_id)

    def lock_key_of(self, entity_type: str, entity_id: str) -> str:
        """The lock name of an entity."""
        return contract.lock_key(self._stream_name, entity_type, entity_id)

    async def publish(self, event: Event, budget: float | None = None) -> Stored:
        """Publish one event; return where it is stored."""
        check_size(event, self.stream.max_payload)
        if event.lease_id:
            return await self._publish_leased(event)
        deadline = _deadline(budget)
        chained = self._committer is not None and _chainable(event)
        waiter = Waiter(event, alone=not chained)
        async with self._gates.hold(self.lock_key(event), waiter) as gate:
            if not chained:
                return await self._publish_held(gate, event, deadline)
            if not waiter.answered:
                await self._publish_waiters(gate, self._take_chain(gate, waiter), deadline)
        return waiter.outcome()

    def _take_chain(self, gate: EntityGate, own: Waiter) -> list[Waiter]:
        """*own* and the plain events queued behind it, in arrival order, up to a batch.

        Earlier arrivals have their answers already (the gate is first come, first
        served); the run stops at the first request that must go alone (a precondition,
        a batch or a stream request), so no request overtakes an earlier one.
        """
        assert self._committer is not None
        queued = list(gate.queued)
        chain = [own]
        for waiter in queued[queued.index(own) + 1 :]:
            if len(chain) >= self._committer.max_batch or waiter.alone:
                break
            if not (waiter.taken or waiter.answered):
                chain.append(waiter)
        for waiter in chain:
            waiter.taken = True
        return chain

    async def _publish_waiters(
        self, gate: EntityGate, chain: list[Waiter], deadline: float | None
    ) -> None:
        """Answer every waiter of *chain*: in one batch if it can, else one by one."""
        try:
            if len(chain) > 1:
                try:
                    stored = await self._append_chain(gate, [w.event for w in chain], deadline)
                except SidecarError as error:  # the lock or the stream: none can go
                    for waiter in chain:
                        waiter.error = error
                    return
                if stored is not None:
                    for waiter, item in zip(chain, stored, strict=True):
                        waiter.result = item
                    return
            for waiter in chain:
                try:
                    waiter.result = await self._publish_held(gate, waiter.event, deadline)
                except Exception as error:
                    waiter.error = internal_error(error)
        finally:
            for waiter in chain:
                # Interrupted before its answer: its own request publishes it at its turn
                # (a batch that did land is then found by its message ids).
                waiter.taken = waiter.answered

    async def _append_chain(
        self, gate: EntityGate, events: list[Event], deadline: float | None
    ) -> list[Stored] | None:
        """One entity's *events* as one batch, fenced once; None: go one by one instead.

        Raises what keeps every one of them from going (no lock, the stream unreachable).
        """
        assert self._committer is not None
        subject = self.stream.subject_for(events[0])
        await self._gates.ensure_lease(gate, _remaining(deadline))
        try:
            if gate.position is None:
                gate.position, gate.guessed = await self.stream.position(subject), False
            stored = await self._committer.append_chain(subject, events, gate.position)
        except (FencingConflict, BatchRefused) as refused:
            if isinstance(refused, FencingConflict) or refused.fenced:
                self._count_conflict(gate)
            gate.position = None
            return None  # one by one re-reads, and answers each event for itself
        except OutcomeUnknown:
            # Refused whole, or no ack: one by one re-reads and, by message id, finds
            # what a lost ack hid.
            gate.position = None
            return None
        except BaseException:
            gate.position = None
            raise
        for item in stored:
            self._count(item)
        gate.position, gate.guessed = gate.position.after(stored[-1], events[-1]), False
        return stored

    async def publish_streamed(
        self, event: Event, index: int, failed: dict[str, tuple[int, SidecarError]]
    ) -> Stored:
        """Publish the *index*-th event of a stream, after the stream's earlier events of
        its entity; refuse it if one of those failed (*failed*: per entity, the first
        failure's index and error)."""
        key = self.lock_key(event)
        async with self._gates.hold(key, Waiter(event, alone=True)) as gate:
            earlier = failed.get(key)
            if earlier is not None and earlier[0] < index:
                raise EarlierEventFailed(
                    f"not published: event {earlier[0]} of this entity on this stream failed "
                    f"({earlier[1].kind.value}); send it and this one again, in order",
                    earlier[1],
                )
            try:
                check_size(event, self.stream.max_payload)
                if event.lease_id:
                    return await self._publish_leased(event)
                return await self._publish_held(gate, event, None)
            except SidecarError as error:
                failed.setdefault(key, (index, error))
                raise
            except Exception as error:
                # Still block the entity's later events: an unexplained failure is a failure.
                internal = internal_error(error)
                failed.setdefault(key, (index, internal))
                raise internal from error

    async def publish_in_order(
        self, events: Sequence[Event], budget: float | None = None
    ) -> list[Stored | SidecarError]:
        """Publish events of one entity in order; after a failure, skip the rest."""
        deadline = _deadline(budget)
        results: list[Stored | SidecarError] = []
        async with self._gates.hold(
            self.lock_key(events[0]), Waiter(events[0], alone=True)
        ) as gate:
            done = await self._chain_in_order(gate, events, deadline, results)
            for index, event in enumerate(events[done:], start=done):
                try:
                    check_size(event, self.stream.max_payload)
                    if event.lease_id:
                        results.append(await self._publish_leased(event))
                    else:
                        results.append(await self._publish_held(gate, event, deadline))
                except SidecarError as error:
                    results.append(error)
                    results.extend(_skipped(events[index + 1 :], error))
                    break
        return results

    async def _chain_in_order(
        self,
        gate: EntityGate,
        events: Sequence[Event],
        deadline: float | None,
        results: list[Stored | SidecarError],
    ) -> int:
        """Publish the plain run at the head of *events* in batches; how many are done.

        A failure that stops them all is recorded with the rest skipped (all done); a
        refused or unacknowledged batch leaves the rest to the one-by-one path.
        """
        if self._committer is None or len(events) < 2:
            return 0
        done = 0
        while done < len(events) and _chainable(events[done]):
            run = []
            for event in events[done : done + self._committer.max_batch]:
                if not (_chainable(event) and _fits(event, self.stream.max_payload)):
                    break  # the one-by-one loop answers it
                run.append(event)
            if not run:
                return done
            try:
                stored = await self._append_chain(gate, run, deadline)
            except SidecarError as error:
                results.append(error)
                results.extend(_skipped(events[done + 1 :], error))
                return len(events)
            if stored is None:
                return done
            results.extend(stored)
            done += len(run)
        return done

    async def _publish_held(self, gate: EntityGate, event: Event, deadline: float | None) -> Stored:
        subject = self.stream.subject_for(event)
        from_leader = False
        for attempt in range(self._max_attempts):
            await self._gates.ensure_lease(gate, _remaining(deadline))
            try:
                fresh = gate.position is None and from_leader
                if gate.position is None:
                    gate.position = await self.stream.position(subject, from_leader=from_leader)
                    gate.guessed = False
                if not fresh and _violates(event, gate.position):
                    # A refusal must rest on the stream leader's view: not on our cache,
                    # nor on a replica that may lag behind.
                    gate.position = await self.stream.position(subject, from_leader=True)
                    gate.guessed = False
                refusal = _precondition_result(event, gate.position, subject)
                if refusal is not None:
                    return refusal
                stored = await self._appender.append(subject, event, gate.position)
            except FencingConflict:
                guessed = gate.guessed
                gate.position, gate.guessed, from_leader = None, False, True
                if guessed:
                    self.stats.stale_guesses += 1
                    continue  # our remembered position was stale: not a race, re-read
                self.stats.fenced += 1
                self._on_fenced()
                log.info(
                    "fenced: the entity moved on under us (attempt %d)",
                    attempt + 1,
                    extra={"entity_type": event.entity_type, "reason": "fenced"},
                )
                # Without a lock, rivals retry in lockstep; jitter breaks the tie.
                await asyncio.sleep(random.uniform(0, _CONFLICT_BACKOFF * (attempt + 1)))
                continue
            except BaseException:
                gate.position = None
                raise
            self._count(stored)
            gate.guessed = False
            if not stored.duplicate:
                gate.position = gate.position.after(stored, event)
            return stored
        raise Contention(
            f"{subject} changed under {self._max_attempts} attempts in a row; retry with the "
            "same idempotency_key"
        )

    async def _publish_leased(self, event: Event) -> Stored:
        lease = self.leases.get(event.lease_id)
        if (lease.entity_type, lease.entity_id) != event.entity_key:
            raise InvalidEvent(
                f"lease {lease.lease_id} is for {lease.entity_type}/{lease.entity_id}, not "
                f"{event.entity_type}/{event.entity_id}"
            )
        async with lease.mutex:
            lease.check_alive()
            refusal = _precondition_result(event, lease.position, lease.subject)
            if refusal is not None:
                return refusal
            try:
                stored = await self._appender.append(lease.subject, event, lease.position)
            except FencingConflict as error:
                self.stats.fenced += 1
                self._on_fenced()
                lease.lost = "another producer published the entity (lock expired or taken over)"
                raise LeaseLost(
                    f"lease {lease.lease_id} was lost: {lease.lost}; nothing was published: "
                    "acquire a new lease and redo the transaction"
                ) from error
            self._count(stored)
            if stored.duplicate:
                # A retry after a lost ack: the lease's view may be one event behind.
                lease.position = await self.stream.position(lease.subject, from_leader=True)
            else:
                lease.position = lease.position.after(stored, event)
            return stored

    def _count_conflict(self, gate: EntityGate) -> None:
        if gate.guessed:
            self.stats.stale_guesses += 1
        else:
            self.stats.fenced += 1
            self._on_fenced()

    def _count(self, stored: Stored) -> None:
        if stored.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.published += 1


def _fits(event: Event, max_payload: int) -> bool:
    try:
        check_size(event, max_payload)
    except InvalidEvent:
        return False
    return True


def _chainable(event: Event) -> bool:
    """Whether *event* may ride in a chain: no lease, no precondition to check first."""
    return not event.lease_id and event.expected_sequence is None and event.entity_version is None


def _violates(event: Event, position: EntityPosition) -> bool:
    if event.expected_sequence is not None and event.expected_sequence != position.sequence:
        return True
    return (
        event.entity_version is not None
        and position.version is not None
        and event.entity_version <= position.version
    )


def _precondition_result(event: Event, position: EntityPosition, subject: str) -> Stored | None:
    """None to go ahead; the first result for a retry of the last event; else refuse."""
    if not _violates(event, position):
        return None
    if position.msg_id == contract.msg_id(
        event.entity_type, event.entity_id, event.idempotency_key
    ):
        if position.digest != event_digest(event):
            raise IdempotencyKeyReused(
                f"idempotency_key {event.idempotency_key!r} was already used for a different "
                "event of this entity; use a new key for a new event"
            )
        return Stored(position.sequence, position.stream_sequence, subject, duplicate=True)
    entity = f"{event.entity_type}/{event.entity_id}"
    if event.expected_sequence is not None and event.expected_sequence != position.sequence:
        raise PreconditionFailed(
            f"{entity}: last sequence is {position.sequence}, expected "
            f"{event.expected_sequence}; not published by this request: re-read the entity "
            "and retry"
        )
    raise PreconditionFailed(
        f"{entity}: entity_version {event.entity_version} is stale, the last published "
        f"version is {position.version}; not published by this request"
    )


def _skipped(events: Sequence[Event], earlier: SidecarError) -> list[Stored | SidecarError]:
    return [
        EarlierEventFailed(
            "not published: an earlier event of this entity in the batch failed "
            f"({earlier.kind.value}); send it and this one again, in order",
            earlier,
        )
        for _ in events
    ]


def _deadline(budget: float | None) -> float | None:
    return None if budget is None else time.monotonic() + budget


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()
