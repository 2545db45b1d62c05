"""One partition, processed strictly in stream order by the replica that holds it.

The partition's durable pull consumer has ``max_ack_pending=1``: the server hands out
its next message only after the current one is acked, so a NAK'd or slow event holds
its partition and nothing behind it overtakes it. Other partitions run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
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
from order_sidecar_client.consumer.event import (
    EntityEvent,
    MalformedEvent,
    malformed_event,
    parse_msg,
)
from order_sidecar_client.consumer.positions import TxT
from order_sidecar_client.consumer.redrive import redrive_entity

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
            max_ack_pending=1,
            max_deliver=-1,  # max deliveries is counted here, so nothing is dropped unseen
        )

    async def run(self) -> None:
        """The fetch loop; returns when stopped or when the lease is no longer safe."""
        js, settings = self.ctx.js, self.ctx.settings
        await js.add_consumer(settings.stream, self.consumer_config())
        sub = await js.pull_subscribe_bind(durable=self.durable, stream=settings.stream)
        replays = await self._replay_subscription()
        next_replay_check = 0.0
        try:
            while self._may_fetch():
                if self.ctx.breaker is not None and not self.ctx.breaker.allows():
                    await self._wait_for_breaker(None)
                    continue
                if time.monotonic() >= next_replay_check:
                    await self._take_replay_requests(replays)
                    next_replay_check = time.monotonic() + settings.replay_check_interval
                await self._fetch_one(sub)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
                await replays.unsubscribe()

    def _may_fetch(self) -> bool:
        return not self.stopping.is_set() and self.ctx.assignment.valid(self.partition)

    def _fetch_timeout(self) -> float:
        # Never wait for a message past the point where the lease stops being safe.
        remaining = self.ctx.assignment.remaining(self.partition)
        return max(0.05, min(self.ctx.settings.fetch_timeout, remaining))

    async def _fetch_one(self, sub: JetStreamContext.PullSubscription) -> None:
        try:
            messages = await sub.fetch(1, timeout=self._fetch_timeout())
        except (TimeoutError, nats.errors.TimeoutError):
            return
        for msg in messages:
            if not self._may_fetch():
                await msg.nak()  # lease lapsed during the fetch: hand it on untouched
                return
            await self._process(msg)

    async def _process(self, msg: Msg) -> None:
        try:
            event = parse_msg(msg)
        except MalformedEvent as error:
            await self._dead_letter_malformed(msg, str(error))
            return
        while True:
            try:
                async with self._heartbeat(msg):
                    decision = await self.ctx.applier.apply(event)
            except Exception as error:  # the handler's failure: hold, retry or dead-letter
                if not self._breaker_refused(error):
                    await self._failed(msg, event, error)
                elif await self._wait_for_breaker(msg):
                    continue
                else:
                    await msg.nak()
                return
            await self._settle(msg, event, decision)
            return

    async def _settle(self, msg: Msg, event: EntityEvent, decision: Decision) -> None:
        self.ctx.metrics.count(decision.outcome.value)
        if decision.outcome in (Outcome.APPLIED, Outcome.SKIPPED):
            self._gap_seen.pop(event.stream_sequence, None)
            await msg.ack()
        elif decision.outcome is Outcome.BLOCKED:
            await self._blocked(msg, event)
        else:
            await self._gap(msg, event, decision.applied)

    async def _failed(self, msg: Msg, event: EntityEvent, error: Exception) -> None:
        self.ctx.metrics.count("failed")
        if event.deliveries < self.ctx.settings.max_deliveries:
            delay = self.ctx.settings.delay_after(event.deliveries)
            log.warning(
                "handler failed on %s (delivery %d): %r", _where(event), event.deliveries, error
            )
            await msg.nak(delay=delay)
            return
        reason = f"max deliveries ({event.deliveries}) reached: {error!r}"
        await self._dead_letter(msg, event, reason, "max_deliveries")

    async def _blocked(self, msg: Msg, event: EntityEvent) -> None:
        if self.ctx.settings.blocked_policy is BlockedPolicy.WAIT:
            await msg.nak(delay=self.ctx.settings.backoff[-1])
            return
        reason = "entity blocked by an earlier dead-lettered event"
        await self._dead_letter(msg, event, reason, "blocked", block=False)

    async def _gap(self, msg: Msg, event: EntityEvent, applied: int) -> None:
        settings = self.ctx.settings
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
            await msg.nak(delay=min(settings.backoff[-1], settings.gap_wait - waited))
            return
        del self._gap_seen[event.stream_sequence]
        if settings.gap_policy is GapPolicy.FAIL:
            await msg.nak()
            raise GapError(f"{reason} at {_where(event)}")
        await self._dead_letter(msg, event, reason, "gap")

    async def _dead_letter(
        self, msg: Msg, event: EntityEvent, reason: str, cause: str, block: bool = True
    ) -> None:
        await self.ctx.dead_letters.publish(event, reason, self.durable)
        if block:
            await self.ctx.applier.block(event, reason)
        self.ctx.metrics.dead_lettered.labels(cause).inc()
        log.error("dead-lettered %s: %s", _where(event), reason)
        await msg.ack()

    async def _dead_letter_malformed(self, msg: Msg, reason: str) -> None:
        # Not part of any entity's sequence: dead-letter it, block nothing, move on.
        meta = msg.metadata
        event = malformed_event(
            msg.headers, msg.subject, msg.data, meta.sequence.stream, int(meta.num_delivered)
        )
        await self._dead_letter(msg, event, reason, "malformed", block=False)

    def _breaker_refused(self, error: Exception) -> bool:
        # An open breaker (or a failure that opened it) is the dependency's fault, not
        # the event's: hold the event instead of spending its deliveries.
        breaker = self.ctx.breaker
        return isinstance(error, BreakerOpen) or (
            breaker is not None and breaker.state is not BreakerState.CLOSED
        )

    async def _wait_for_breaker(self, msg: Msg | None) -> bool:
        """Hold (with in-progress heartbeats) until the breaker lets a call through."""
        breaker = self.ctx.breaker
        assert breaker is not None
        while not breaker.allows():
            if not self._may_fetch():
                return False
            if msg is not None:
                await msg.in_progress()
            wait = min(self.ctx.settings.ack_wait / 3, max(self._fetch_timeout(), 0.05))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(breaker.wait_until_allowed(), wait)
        return True

    @contextlib.asynccontextmanager
    async def _heartbeat(self, msg: Msg) -> AsyncIterator[None]:
        """Tell the server the event is in progress every ack_wait/3 while the handler runs."""
        interval = self.ctx.settings.ack_wait / 3

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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


def _where(event: EntityEvent) -> str:
    key = event.key
    return (
        f"{key.entity_type}/{key.entity_id}#{event.sequence} (stream seq {event.stream_sequence})"
    )
