"""One partition, processed strictly in stream order by the replica that holds it.

The partition's durable pull consumer has ``max_ack_pending = batch_size``: the worker
fetches up to that many events, applies them in one transaction of the store (in stream
order, so in each entity's order) and acks each after the commit. The server hands out
nothing beyond them until some are acked, and the worker works from the head of its
window only, so a NAK'd or slow event holds its partition and nothing behind it
overtakes it. Other partitions run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Generic

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from order_sidecar_client.consumer.apply import Applier, ConsumerMetrics, Decision, Outcome
from order_sidecar_client.consumer.assignment import Assignment
from order_sidecar_client.consumer.breaker import BreakerState, CircuitBreaker
from order_sidecar_client.consumer.config import BlockedPolicy, GapPolicy
from order_sidecar_client.consumer.config import ConsumerConfig as Settings
from order_sidecar_client.consumer.dlq import DeadLetters
from order_sidecar_client.consumer.errors import BreakerOpen, GapError
from order_sidecar_client.consumer.event import EntityEvent, malformed_event
from order_sidecar_client.consumer.positions import TxT
from order_sidecar_client.consumer.redrive import redrive_entity
from order_sidecar_client.consumer.window import Held, Window

log = logging.getLogger(__name__)


@dataclass
class WorkerContext(Generic[TxT]):
    """What every partition worker of one consumer shares."""

    js: JetStreamContext
    settings: Settings
    prefix: str
    applier: Applier[TxT]
    dead_letters: DeadLetters
    assignment: Assignment
    metrics: ConsumerMetrics
    breaker: CircuitBreaker | None = None


class PartitionWorker(Generic[TxT]):
    """Fetches, applies and acks one partition's events until told to stop."""

    def __init__(self, partition: int, ctx: WorkerContext[TxT]) -> None:
        self.partition = partition
        self.ctx = ctx
        self.stopping = asyncio.Event()
        self.durable = f"{ctx.settings.name}-p{partition}"
        self.window = Window()
        self._gap_seen: dict[int, float] = {}

    def consumer_config(self) -> ConsumerConfig:
        """The partition's durable consumer on the entity stream."""
        settings = self.ctx.settings
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=f"{self.ctx.prefix}.*.{self.partition}.>",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=settings.ack_wait,
            # Editable on an existing durable: changing batch_size updates it in place.
            max_ack_pending=settings.batch_size,
            max_deliver=-1,  # max deliveries is counted here, so nothing is dropped unseen
        )

    async def run(self) -> None:
        """The fetch loop; returns when stopped or when the lease is no longer safe."""
        js, settings = self.ctx.js, self.ctx.settings
        await js.add_consumer(settings.stream, self.consumer_config())
        sub = await js.pull_subscribe_bind(durable=self.durable, stream=settings.stream)
        replays = await self._replay_subscription()
        keep_alive = asyncio.create_task(self._keep_alive(), name=f"keep-alive-{self.durable}")
        next_replay_check = 0.0
        try:
            while self._may_fetch():
                if self.ctx.breaker is not None and not self.ctx.breaker.allows():
                    await self._wait_for_breaker()
                    continue
                if time.monotonic() >= next_replay_check:
                    await self._take_replay_requests(replays)
                    next_replay_check = time.monotonic() + settings.replay_check_interval
                if self.window.head_is_ready():
                    await self._process_head()
                else:
                    await self._fetch(sub)
        finally:
            keep_alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keep_alive
            await self._hand_back()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
                await replays.unsubscribe()

    def _may_fetch(self) -> bool:
        return not self.stopping.is_set() and self.ctx.assignment.valid(self.partition)

    def _fetch_timeout(self) -> float:
        # Never wait for a message past the point where the lease stops being safe.
        remaining = self.ctx.assignment.remaining(self.partition)
        return max(0.05, min(self.ctx.settings.fetch_timeout, remaining))

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> None:
        """Top the window up to a batch (a NAK'd head comes back this way too)."""
        wanted = max(1, self.ctx.settings.batch_size - len(self.window))
        try:
            messages = await sub.fetch(wanted, timeout=self._fetch_timeout())
        except (TimeoutError, nats.errors.TimeoutError):
            return
        for msg in messages:
            self.window.add(msg)  # a lease lapsed meanwhile: the loop hands them back

    async def _hand_back(self) -> None:
        """NAK what was not settled (the lease lapsed, or stopping), in stream order, so
        the next holder gets it at once; NAK'd ones come back by themselves."""
        for held in self.window:
            if not held.nakked:
                with contextlib.suppress(Exception):
                    await held.msg.nak()
            self.window.settle(held)

    async def _process_head(self) -> None:
        """Apply the ready events at the head in one transaction; ack them after the
        commit; then deal with the event that stopped the batch, if one did."""
        head = self.window.head()
        assert head is not None
        if head.event is None:
            await self._dead_letter_malformed(head)
            return
        run = self.window.ready_run(self.ctx.settings.batch_size)
        result = await self.ctx.applier.apply_batch(
            [held.event for held in run if held.event is not None],
            self._may_fetch,
            self.ctx.settings.batch_max_seconds,
        )
        for held in run[: len(result.decisions)]:
            if self._gap_seen:
                self._gap_seen.pop(held.stream_sequence, None)
            await held.msg.ack()  # after the commit: a crash before it replays, skipped
            self.window.settle(held)
        for outcome, count in Counter(d.outcome.value for d in result.decisions).items():
            self.ctx.metrics.count(outcome, count)
        if result.stop is not None:
            await self._settle(run[len(result.decisions)], result.stop)
        elif result.error is not None:
            await self._on_error(run[len(result.decisions)], result.error)

    async def _settle(self, held: Held, decision: Decision) -> None:
        self.ctx.metrics.count(decision.outcome.value)
        if decision.outcome is Outcome.BLOCKED:
            await self._blocked(held)
        else:
            await self._gap(held, decision.applied)

    async def _on_error(self, held: Held, error: Exception) -> None:
        # The handler's failure: hold, retry or dead-letter.
        if not self._breaker_refused(error):
            await self._failed(held, _event(held), error)
        # else: held unacked (heartbeats, no NAK): the loop waits at the breaker's gate
        # and then retries it, so no delivery is spent while a dependency is down.

    async def _failed(self, held: Held, event: EntityEvent, error: Exception) -> None:
        self.ctx.metrics.count("failed")
        if event.deliveries < self.ctx.settings.max_deliveries:
            delay = self.ctx.settings.delay_after(event.deliveries)
            log.warning(
                "handler failed on %s (delivery %d): %r", _where(event), event.deliveries, error
            )
            await self._nak(held, delay)
            return
        reason = f"max deliveries ({event.deliveries}) reached: {error!r}"
        await self._dead_letter(held, event, reason, "max_deliveries")

    async def _blocked(self, held: Held) -> None:
        if self.ctx.settings.blocked_policy is BlockedPolicy.WAIT:
            await self._nak(held, self.ctx.settings.backoff[-1])
            return
        reason = "entity blocked by an earlier dead-lettered event"
        await self._dead_letter(held, _event(held), reason, "blocked", block=False)

    async def _gap(self, held: Held, applied: int) -> None:
        settings, event = self.ctx.settings, _event(held)
        first = self._gap_seen.setdefault(event.stream_sequence, time.monotonic())
        waited = time.monotonic() - first
        reason = f"gap: sequence {event.sequence} after applied {applied}"
        if waited < settings.gap_wait:
            log.warning(
                "%s at %s; holding it (%.1fs of %.1fs)",
                reason,
                _where(event),
                waited,
                settings.gap_wait,
            )
            await self._nak(held, min(settings.backoff[-1], settings.gap_wait - waited))
            return
        del self._gap_seen[event.stream_sequence]
        if settings.gap_policy is GapPolicy.FAIL:
            await self._nak(held, None)
            raise GapError(f"{reason} at {_where(event)}")
        await self._dead_letter(held, event, reason, "gap")

    async def _nak(self, held: Held, delay: float | None) -> None:
        """NAK the head: the server redelivers it after *delay*; what is behind it waits."""
        await held.msg.nak(delay=delay)
        held.nakked = True

    async def _dead_letter(
        self, held: Held, event: EntityEvent, reason: str, cause: str, block: bool = True
    ) -> None:
        await self.ctx.dead_letters.publish(event, reason, self.durable)
        if block:
            await self.ctx.applier.block(event, reason)
        self.ctx.metrics.dead_lettered.labels(cause).inc()
        log.error("dead-lettered %s: %s", _where(event), reason)
        await held.msg.ack()
        self.window.settle(held)

    async def _dead_letter_malformed(self, held: Held) -> None:
        # Not part of any entity's sequence: dead-letter it, block nothing, move on.
        msg, meta = held.msg, held.msg.metadata
        event = malformed_event(
            msg.headers, msg.subject, msg.data, meta.sequence.stream, int(meta.num_delivered)
        )
        await self._dead_letter(held, event, held.malformed, "malformed", block=False)

    def _breaker_refused(self, error: Exception) -> bool:
        # An open breaker (or a failure that opened it) is the dependency's fault, not
        # the event's: hold the event instead of spending its deliveries.
        breaker = self.ctx.breaker
        return isinstance(error, BreakerOpen) or (
            breaker is not None and breaker.state is not BreakerState.CLOSED
        )

    async def _wait_for_breaker(self) -> None:
        """Wait (the window held by the keep-alive) until the breaker lets a call through
        or the partition must be given up."""
        breaker = self.ctx.breaker
        assert breaker is not None
        while not breaker.allows() and self._may_fetch():
            wait = min(self.ctx.settings.ack_wait / 3, max(self._fetch_timeout(), 0.05))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(breaker.wait_until_allowed(), wait)

    async def _keep_alive(self) -> None:
        """Every ack_wait/3, tell the server each held event is in progress, so a slow
        handler, a long batch or a wait for the breaker is not redelivered under it."""
        interval = self.ctx.settings.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            for held in self.window:
                if not held.nakked:
                    with contextlib.suppress(nats.errors.Error):
                        await held.msg.in_progress()

    async def _replay_subscription(self) -> Any:
        settings = self.ctx.settings
        durable = f"{settings.name}-replay-p{self.partition}"
        prefix = settings.dlq_subject_prefix
        await self.ctx.js.add_consumer(
            settings.dlq_stream_name,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=f"{prefix}.replay.*.{self.partition}.>",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=max(settings.ack_wait, 30.0),
            ),
        )
        return await self.ctx.js.pull_subscribe_bind(
            durable=durable, stream=settings.dlq_stream_name
        )

    async def _take_replay_requests(self, replays: Any) -> None:
        # Ask first (one round trip): a fetch that finds nothing waits out its timeout,
        # and that wait, every replay_check_interval, would idle the partition.
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            info = await replays.consumer_info()
            if not (info.num_pending or info.num_ack_pending):
                return
        try:
            requests: list[Msg] = await replays.fetch(10, timeout=0.1)
        except (TimeoutError, nats.errors.TimeoutError):
            return
        for request in requests:
            tail = ".".join(request.subject.split(".")[-3:])
            headers = request.headers or {}
            log.info("replay requested for %s", tail)
            round_ = f"replay-{request.metadata.sequence.stream}"
            done = await redrive_entity(self.ctx, tail, headers, self._may_fetch, round_)
            if done:
                await request.ack()
            else:
                await request.nak(delay=self.ctx.settings.backoff[-1])


def _event(held: Held) -> EntityEvent:
    assert held.event is not None  # malformed messages never reach a decision
    return held.event


def _where(event: EntityEvent) -> str:
    key = event.key
    return (
        f"{key.entity_type}/{key.entity_id}#{event.sequence} (stream seq {event.stream_sequence})"
    )
