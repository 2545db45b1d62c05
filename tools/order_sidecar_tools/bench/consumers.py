"""The suite's consumer rows (target T6): reading one stream back, raw and in order.

One stream is filled in the sidecar's wire format (``consume.fill``), then read, each
reader with its own durable: a raw pull consumer that fetches in batches and acks each
message (the broker's consumer floor), and the ordered consumer
(``order_sidecar_client.consumer`` through the ``replicate_sqlite`` example, as
``consume.replicate`` runs it) with 1 and with 3 replica processes.
"""

from __future__ import annotations

import uuid

import nats

from order_sidecar_tools.bench.baselines import raw_pull
from order_sidecar_tools.bench.consume import Row, fill, replicate
from order_sidecar_tools.bench.rows import SuiteContext, SuiteRow, progress
from order_sidecar_tools.bench.runner import BenchConfig, BenchRow

CONSUMER_ENTITIES = 1000
PARTITIONS = 16
EVENTS_PER_SUITE_EVENT = 2
"""The consumer rows read this many times ``--events``."""


def consumer_events(config: BenchConfig) -> int:
    """Events the consumer rows read: a multiple of ``--events``."""
    return max(1, config.events * EVENTS_PER_SUITE_EVENT)


def consumer_setting(config: BenchConfig) -> str:
    """The setting column of the consumer rows (targets find rows by it)."""
    return f"consume {consumer_events(config)} ev, {CONSUMER_ENTITIES} ent, {PARTITIONS} part"


def ordered_mode(replicas: int) -> str:
    """The mode column of an ordered-consumer row."""
    return f"ordered consumer, {replicas} replica{'s' if replicas > 1 else ''} (SQLite)"


async def run_consumers(ctx: SuiteContext) -> list[SuiteRow]:
    """Raw pull, then the ordered consumer with 1 and 3 replicas, over one filled stream."""
    events = consumer_events(ctx.config)
    stream = f"BENCH_{uuid.uuid4().hex[:8].upper()}"
    setting = consumer_setting(ctx.config)
    nc = await nats.connect(ctx.url)
    try:
        progress(f"consumer: filling a stream with {events} events")
        await fill(nc, stream, events, CONSUMER_ENTITIES, PARTITIONS)
        progress("consumer: raw pull fetch+ack")
        floor = SuiteRow(setting, await raw_pull(nc, stream, events), group="consumer")
        rows = [floor]
        for replicas in (1, 3):
            progress(f"consumer: ordered, {replicas} replica(s)")
            row = await replicate(
                ctx.url, stream, events, replicas, name=f"bench{replicas}", workdir=ctx.scratch
            )
            rows.append(SuiteRow(setting, _bench_row(row), group="consumer"))
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()
    for item in rows:
        item.divide_by(floor.row, "raw pull")
    return rows


def _bench_row(row: Row) -> BenchRow:
    """A consumer run as a table row (no per-call latency: p50/p99 stay 0)."""
    return BenchRow(
        mode=ordered_mode(row.replicas),
        events=row.events,
        failed=0,
        seconds=round(row.seconds, 3),
        events_per_s=round(row.rate, 1),
        call_p50_ms=0.0,
        call_p99_ms=0.0,
    )
