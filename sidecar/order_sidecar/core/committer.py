"""Group commit: the appends that queue while a batch is in flight go out together.

The publisher hands every fenced append to a committer instead of the log. What has
queued is sent as one atomic batch (``EventLog.append_batch``): stored together or not
at all, with one ack for all. A batch holds at most one append per entity, because an
entity has at most one append outstanding (its gate lets one request through at a time),
so batches in flight never share an entity. Nothing waits on purpose: an append that
finds a free slot goes at once; what arrives while every slot is busy goes with the next
batch, as in a database's group commit.

A refused batch (a stale fence, a duplicate message id, a limit, a leader change) is
never half-stored, so the committer falls back to appending each event on its own, where
the usual fencing and dedupe rules answer each one. A batch whose ack was lost is
resolved by reading the stream, never guessed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from order_sidecar_client import contract

from order_sidecar.core.errors import BatchRefused, OutcomeUnknown, Unavailable
from order_sidecar.core.model import Append, EntityPosition, Event, Stored
from order_sidecar.core.ports import BatchLog

log = logging.getLogger(__name__)

#: Default messages per batch: JetStream's limit is 1,000; the gain flattens out well before.
MAX_BATCH = 500
#: Default batches in flight at once (JetStream allows 50 per stream, shared by all sidecars).
MAX_IN_FLIGHT = 4


@dataclass
class CommitStats:
    """Counters for GetStatus, metrics and tests."""

    batches: int = 0
    batched_events: int = 0
    singles: int = 0
    refused: int = 0
    unknown: int = 0


@dataclass(slots=True)
class _Pending:
    """What one caller waits for: one append, or a chain of one entity's appends."""

    appends: list[Append]
    done: asyncio.Future[list[Stored]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def single(self) -> bool:
        return len(self.appends) == 1


class GroupCommitter:
    """Appends to *log* in atomic batches; ``append`` is a drop-in for ``EventLog.append``."""

    def __init__(
        self, log: BatchLog, max_batch: int = MAX_BATCH, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._log = log
        self.max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: deque[_Pending] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._pump_scheduled = False
        self.stats = CommitStats()

    async def append(self, subject: str, event: Event, after: EntityPosition) -> Stored:
        """Append *event* as its entity's next event, only if *after* is still its last.

        A refused or unacknowledged batch is settled here: the event is appended on its
        own, or found in the stream.
        """
        (stored,) = await self._submit([Append(subject, event, after)])
        return stored

    async def append_chain(
        self, subject: str, events: Sequence[Event], after: EntityPosition
    ) -> list[Stored]:
        """Append one entity's *events*, in order, after *after*, all in one batch.

        Only the first is fenced: the batch is checked and stored as a whole, so the
        others follow it directly. Raises BatchRefused (nothing stored) or OutcomeUnknown
        (no ack): the caller then publishes the events one by one, whose fencing and
        message ids settle what is already there.
        """
        if not 0 < len(events) <= self.max_batch:
            raise ValueError(f"a chain holds 1-{self.max_batch} events, not {len(events)}")
        appends = []
        for index, event in enumerate(events):
            position = after if index == 0 else EntityPosition(after.sequence + index, 0)
            appends.append(Append(subject, event, position, fenced=index == 0))
        return await self._submit(appends)

    @property
    def queued(self) -> int:
        """Appends waiting for a batch slot."""
        return sum(len(p.appends) for p in self._queue)

    async def _submit(self, appends: list[Append]) -> list[Stored]:
        pending = _Pending(appends)
        self._queue.append(pending)
        self._schedule_pump()
        return await pending.done

    def _schedule_pump(self) -> None:
        # Appends made in the same turn of the loop join one batch; no timer is involved.
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        while self._queue and len(self._in_flight) < self._max_in_flight:
            batch = self._next_batch()
            if not batch:
                continue
            task = asyncio.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._sent)

    def _next_batch(self) -> list[_Pending]:
        """The queue's head, up to max_batch messages; callers that gave up are dropped."""
        batch: list[_Pending] = []
        size = 0
        while self._queue and size + len(self._queue[0].appends) <= self.max_batch:
            pending = self._queue.popleft()
            if not pending.done.done():
                batch.append(pending)
                size += len(pending.appends)
        return batch

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if self._queue:
            self._schedule_pump()

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1 and batch[0].single:
                self.stats.singles += 1
                await self._one_by_one(batch)
            else:
                await self._commit(batch)
        except BaseException as error:  # every caller gets an answer, even on cancel
            for pending in batch:
                _fail(pending, _as_exception(error))
            if not isinstance(error, Exception):
                raise

    async def _commit(self, batch: list[_Pending]) -> None:
        appends = [append for pending in batch for append in pending.appends]
        try:
            stored = await self._log.append_batch(appends)
        except BatchRefused as error:
            self.stats.refused += 1
            log.debug("batch of %d refused (%s): one by one", len(appends), error)
            await self._one_by_one(self._singles_only(batch, error))
            return
        except OutcomeUnknown as error:
            self.stats.unknown += 1
            log.info("no ack for a batch of %d (%s): reading the stream", len(appends), error)
            await self._resolve(self._singles_only(batch, error), error)
            return
        self.stats.batches += 1
        self.stats.batched_events += len(appends)
        offset = 0
        for pending in batch:
            _settle(pending, stored[offset : offset + len(pending.appends)])
            offset += len(pending.appends)

    @staticmethod
    def _singles_only(batch: list[_Pending], error: Exception) -> list[_Pending]:
        """Chains go back to their publisher with *error*; single appends stay here."""
        for pending in batch:
            if not pending.single:
                _fail(pending, error)
        return [pending for pending in batch if pending.single]

    async def _one_by_one(self, batch: Sequence[_Pending]) -> None:
        """Each event on its own: the log's own fencing and dedupe answer each."""

        async def one(pending: _Pending) -> None:
            (append,) = pending.appends
            try:
                stored = await self._log.append(append.subject, append.event, append.after)
            except Exception as error:
                _fail(pending, error)
                return
            _settle(pending, [stored])

        await asyncio.gather(*(one(p) for p in batch))

    async def _resolve(self, batch: list[_Pending], error: OutcomeUnknown) -> None:
        """After a lost batch ack: what the stream holds decides, per entity.

        An entity whose last event carries our message id was stored by this batch; a
        batch is atomic, so the others were too, but each is read rather than assumed.
        One that is not there was not stored (or was overtaken): it is appended again on
        its own, where the fence and the message id keep a late commit from doubling it.
        """
        unresolved = []
        for pending in batch:
            (append,) = pending.appends
            try:
                position = await self._log.position(append.subject, from_leader=True)
            except Unavailable:
                _fail(pending, error)
                continue
            if position.msg_id == _msg_id(append.event):
                stored = Stored(position.sequence, position.stream_sequence, append.subject, False)
                _settle(pending, [stored])
            else:
                unresolved.append(pending)
        await self._one_by_one(unresolved)


def _msg_id(event: Event) -> str:
    return contract.msg_id(event.entity_type, event.entity_id, event.idempotency_key)


def _settle(pending: _Pending, stored: list[Stored]) -> None:
    if not pending.done.done():
        pending.done.set_result(stored)


def _fail(pending: _Pending, error: BaseException) -> None:
    if not pending.done.done():
        pending.done.set_exception(error)


def _as_exception(error: BaseException) -> Exception:
    if isinstance(error, Exception):
        return error
    return Unavailable("the sidecar stopped before the batch was answered; retry")
