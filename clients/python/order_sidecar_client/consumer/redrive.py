"""Re-driving one entity after ``dlq replay``: unblock it and re-read it from the stream.

The stream keeps every event (guarantee G5), so the entity's subject is re-read from
its start and each event goes through the same apply-once decision: what was applied is
skipped, the rest is applied in order. The dead copies are purged first; an event that
fails again is dead-lettered again (and blocks again), so nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from order_sidecar_client.consumer.apply import Outcome
from order_sidecar_client.consumer.errors import BreakerOpen
from order_sidecar_client.consumer.event import (
    HEADER_ENTITY_ID,
    HEADER_ENTITY_TYPE,
    EntityEvent,
    EntityKey,
    MalformedEvent,
    malformed_event,
    parse_headers,
)

if TYPE_CHECKING:
    from .worker import WorkerContext

log = logging.getLogger(__name__)


async def redrive_entity(
    ctx: WorkerContext[Any],
    tail: str,
    headers: Mapping[str, str],
    may_go_on: Callable[[], bool],
    round_: str,
) -> bool:
    """Re-drive the entity at ``{prefix}.{tail}``; False if it must be retried later."""
    key = EntityKey(headers.get(HEADER_ENTITY_TYPE, ""), headers.get(HEADER_ENTITY_ID, ""))
    store = ctx.applier.store
    async with store.transaction() as tx:
        await store.unblock(tx, key)
    await ctx.dead_letters.purge(tail)
    async for event, malformed in _read_subject(ctx, f"{ctx.prefix}.{tail}"):
        if not may_go_on():
            return False
        if malformed is not None:
            # Never applicable and its copy was purged above: dead-letter it again (no
            # block) so it stays visible, and go on with the entity's real events.
            consumer = f"{ctx.settings.name}-replay"
            await ctx.dead_letters.publish(event, f"replay: {malformed}", consumer, round_)
            ctx.metrics.dead_lettered.labels("malformed").inc()
            continue
        if not await _apply_with_retries(ctx, event, may_go_on, round_):
            return True  # dead-lettered and blocked again: the request itself is done
    log.info("re-drove %s/%s", key.entity_type, key.entity_id)
    return True


async def _apply_with_retries(
    ctx: WorkerContext[Any], event: EntityEvent, may_go_on: Callable[[], bool], round_: str
) -> bool:
    """Apply one re-read event; False when it was dead-lettered (the re-drive stops)."""
    settings = ctx.settings
    attempt = 0
    while True:
        attempt += 1
        try:
            decision = await ctx.applier.apply(event)
        except BreakerOpen:
            if ctx.breaker is not None:
                await asyncio.wait_for(ctx.breaker.wait_until_allowed(), settings.ack_wait)
            attempt -= 1
            continue
        except Exception as error:
            if attempt < settings.max_deliveries and may_go_on():
                await asyncio.sleep(settings.delay_after(attempt))
                continue
            await _dead_letter(ctx, event, f"replay: max deliveries reached: {error!r}", round_)
            return False
        ctx.metrics.count(decision.outcome.value)
        if decision.outcome in (Outcome.APPLIED, Outcome.SKIPPED):
            return True
        reason = f"replay: {decision.outcome.value} at sequence {event.sequence}"
        await _dead_letter(ctx, event, reason, round_)
        return False


async def _dead_letter(
    ctx: WorkerContext[Any], event: EntityEvent, reason: str, round_: str
) -> None:
    await ctx.dead_letters.publish(event, reason, f"{ctx.settings.name}-replay", round_)
    await ctx.applier.block(event, reason)
    ctx.metrics.dead_lettered.labels("replay").inc()


async def _read_subject(
    ctx: WorkerContext[Any], subject: str
) -> AsyncIterator[tuple[EntityEvent, str | None]]:
    """The subject's events in stream order, from its first, each with ``None`` or, for a
    malformed message, the reason (the event is then :func:`malformed_event`)."""
    stream = ctx.settings.stream
    info = await ctx.js.add_consumer(
        stream,
        ConsumerConfig(
            filter_subject=subject,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
        ),
    )
    if not info.num_pending:
        await ctx.js.delete_consumer(stream, info.name)
        return
    sub = await ctx.js.pull_subscribe_bind(info.name, stream=stream)
    try:
        while True:
            try:
                batch = await sub.fetch(100, timeout=2.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return
            for msg in batch:
                meta = msg.metadata
                stream_sequence = meta.sequence.stream
                try:
                    event = parse_headers(msg.headers, msg.subject, msg.data, stream_sequence)
                except MalformedEvent as error:
                    yield (
                        malformed_event(msg.headers, msg.subject, msg.data, stream_sequence),
                        str(error),
                    )
                else:
                    yield event, None
                if meta.num_pending == 0:
                    return
    finally:
        await sub.unsubscribe()
