"""The suite's grid (targets T1-T4): payload sizes x entity counts x 1 or 3 sidecars.

For each payload: raw publish awaiting each ack, raw pipelined ``publish_async`` (the
baseline of every row of that payload), the bare gRPC echo, then sidecar processes with
unary ``Publish``, a lease round (a quarter of the events: the slowest mode, and no
target's), ``PublishStream`` and ``PublishBatch``.
"""

from __future__ import annotations

import uuid

from order_sidecar_tools.bench.baselines import grpc_floor, raw_publish
from order_sidecar_tools.bench.processes import start_sidecars
from order_sidecar_tools.bench.rows import SuiteContext, SuiteRow, progress
from order_sidecar_tools.bench.runner import BenchConfig, run_bench

RAW_ENTITIES = 100
"""Subjects the raw baselines spread their messages over."""
THREE_SIDECAR_ENTITIES = (1, 100)
"""Entity counts also measured through 3 sidecars."""


async def run_grid(ctx: SuiteContext) -> list[SuiteRow]:
    """Every payload of ``--suite-payloads`` over every count of ``--suite-entities``."""
    rows: list[SuiteRow] = []
    for payload in ctx.config.numbers("suite_payloads"):
        rows.extend(await _one_payload(ctx, payload))
    return rows


async def _one_payload(ctx: SuiteContext, payload: int) -> list[SuiteRow]:
    config = ctx.config
    body = b"x" * payload
    progress(f"{payload} B: raw NATS and the gRPC floor")
    pipelined = await raw_publish(ctx.url, config.events, body, RAW_ENTITIES, 64)
    found = [
        SuiteRow(
            f"{payload} B",
            await raw_publish(ctx.url, max(1, config.events // 4), body, RAW_ENTITIES, 1),
        ),
        SuiteRow(f"{payload} B", pipelined),
        SuiteRow(f"{payload} B", await grpc_floor(ctx.echo_target, config.events, payload, 64)),
    ]
    for entities in config.numbers("suite_entities"):
        for sidecar_count in (1, 3):
            if sidecar_count == 1 or entities in THREE_SIDECAR_ENTITIES:
                found.extend(await _cell(ctx, payload, entities, sidecar_count))
    for item in found:
        item.divide_by(pipelined, "raw pipelined")
    return found


async def _cell(
    ctx: SuiteContext, payload: int, entities: int, sidecar_count: int
) -> list[SuiteRow]:
    config = ctx.config
    progress(f"{payload} B, {entities} entities, {sidecar_count} sidecar(s)")
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    children = await start_sidecars(ctx.url, sidecar_count, name, config.suite_redis_url)
    try:
        cell = BenchConfig(
            events=config.events,
            entities=entities,
            concurrency=config.concurrency,
            batch_size=config.batch_size,
            payload_bytes=payload,
        )
        targets = [c.target for c in children]
        measured = await run_bench(cell, targets, lease_events=max(1, config.events // 4))
    finally:
        for child in children:
            child.stop()
    setting = grid_setting(payload, entities, sidecar_count)
    return [SuiteRow(setting, row) for row in measured]


def grid_setting(payload: int, entities: int, sidecars: int) -> str:
    """The setting column of a grid row (targets find rows by it)."""
    return f"{payload} B, {entities} ent, {sidecars} sc"
