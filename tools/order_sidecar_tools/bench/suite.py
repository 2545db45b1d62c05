"""``order-sidecar bench --suite``: the sidecar against the broker's own speed, in one run.

On one embedded nats-server (or ``--nats-url``) it measures, side by side:

- raw nats-py publish awaiting each ack (the seed's "maxAck=1");
- raw pipelined ``publish_async`` with 64 in flight (what the broker can do unordered);
- a bare grpc.aio echo server (the gRPC floor for a unary call);
- sidecar processes (nats-kv locks, or Redis with ``--suite-redis-url``): unary
  ``Publish``, a lease round, ``PublishStream`` and ``PublishBatch``,

for each payload size and entity count, with 1 sidecar and with 3. Every row carries
its ratio to raw pipelined publish of the same payload.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import nats
from order_sidecar.jetstream.embedded import EmbeddedNats, free_port

from order_sidecar_tools.bench.processes import ECHO_METHOD, Child, start_sidecars
from order_sidecar_tools.bench.rss import RssReport, measure_rss
from order_sidecar_tools.bench.runner import BenchConfig, BenchRow, percentile, run_bench


@dataclass
class SuiteRow:
    """One measured mode in one setting."""

    setting: str
    row: BenchRow
    ratio: float = 0.0


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def raw_publish(
    url: str, events: int, payload: bytes, entities: int, window: int
) -> BenchRow:
    """JetStream publish straight from nats-py: one at a time (window 1) or pipelined."""
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=max(window, 1))
    prefix = f"raw{uuid.uuid4().hex[:8]}"
    await js.add_stream(name=prefix.upper(), subjects=[f"{prefix}.>"])
    latencies: list[float] = []
    started = time.perf_counter()
    if window == 1:
        for n in range(events):
            sent = time.perf_counter()
            await js.publish(f"{prefix}.{n % entities}", payload)
            latencies.append(time.perf_counter() - sent)
    else:
        for n in range(events):
            sent = time.perf_counter()
            future = await js.publish_async(f"{prefix}.{n % entities}", payload)
            future.add_done_callback(functools.partial(_record, latencies, sent))
        await js.publish_async_completed()
    seconds = time.perf_counter() - started
    await js.delete_stream(prefix.upper())
    await nc.close()
    mode = (
        "raw publish, await each ack" if window == 1 else f"raw publish_async, {window} in flight"
    )
    return _row(mode, events, seconds, latencies)


async def grpc_floor(target: str, events: int, payload_bytes: int, concurrency: int) -> BenchRow:
    """Unary calls to a bare grpc.aio echo server: the least a unary RPC costs here."""
    body = b"x" * (payload_bytes + 64)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
        remaining = events

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                sent = time.perf_counter()
                await echo(body, timeout=30)
                latencies.append(time.perf_counter() - sent)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return _row(f"grpc.aio echo, {concurrency} in flight", events, seconds, latencies)


def _record(latencies: list[float], sent: float, _: object) -> None:
    latencies.append(time.perf_counter() - sent)


def _row(mode: str, events: int, seconds: float, latencies: list[float]) -> BenchRow:
    return BenchRow(
        mode=mode,
        events=events,
        failed=0,
        seconds=round(seconds, 3),
        events_per_s=round(events / seconds, 1),
        call_p50_ms=round(percentile(latencies, 0.50), 2),
        call_p99_ms=round(percentile(latencies, 0.99), 2),
    )


async def run_suite(
    config: BenchConfig, payloads: list[int], entity_counts: list[int]
) -> tuple[list[SuiteRow], RssReport | None]:
    """Every mode, side by side, on one NATS server; then the memory check."""

    rows: list[SuiteRow] = []
    memory = None
    with tempfile.TemporaryDirectory(prefix="order-sidecar-bench-") as scratch:
        server = EmbeddedNats(Path(scratch))
        url = await server.start()
        echo_port = free_port()
        echo = Child(["order_sidecar_tools.bench.processes", str(echo_port)], echo_port)
        try:
            await echo.wait_ready(health=False)
            for payload in payloads:
                rows.extend(await _one_payload(config, url, echo.target, payload, entity_counts))
            if config.suite_rss_entities:
                _progress(f"memory: {config.suite_rss_entities} new entities, 1 sidecar")
                memory = await measure_rss(url, config.suite_rss_entities)
        finally:
            echo.stop()
            server.stop()
    return rows, memory


async def _one_payload(
    config: BenchConfig, url: str, echo_target: str, payload: int, entity_counts: list[int]
) -> list[SuiteRow]:
    body = b"x" * payload
    _progress(f"{payload} B: raw NATS and the gRPC floor")
    pipelined = await raw_publish(url, config.events, body, 100, 64)
    found = [
        SuiteRow(f"{payload} B", await raw_publish(url, config.events // 4, body, 100, 1)),
        SuiteRow(f"{payload} B", pipelined),
        SuiteRow(f"{payload} B", await grpc_floor(echo_target, config.events, payload, 64)),
    ]
    for entities in entity_counts:
        for sidecar_count in (1, 3):
            if sidecar_count == 3 and entities not in (1, 100):
                continue
            _progress(f"{payload} B, {entities} entities, {sidecar_count} sidecar(s)")
            name = f"BENCH_{uuid.uuid4().hex[:8]}"
            children = await start_sidecars(url, sidecar_count, name, config.suite_redis_url)
            try:
                cell = BenchConfig(
                    events=config.events,
                    entities=entities,
                    concurrency=config.concurrency,
                    batch_size=config.batch_size,
                    payload_bytes=payload,
                )
                measured = await run_bench(cell, [c.target for c in children])
            finally:
                for child in children:
                    child.stop()
            setting = f"{payload} B, {entities} ent, {sidecar_count} sc"
            found.extend(SuiteRow(setting, row) for row in measured)
    for item in found:
        item.ratio = round(item.row.events_per_s / pipelined.events_per_s, 3)
    return found


def format_suite(rows: list[SuiteRow]) -> str:
    """The suite's table."""
    columns = [
        "setting",
        "mode",
        "events",
        "failed",
        "events/s",
        "p50 ms",
        "p99 ms",
        "x raw pipelined",
    ]
    cells = [
        [
            r.setting,
            r.row.mode,
            str(r.row.events),
            str(r.row.failed),
            f"{r.row.events_per_s:.0f}",
            f"{r.row.call_p50_ms:.2f}",
            f"{r.row.call_p99_ms:.2f}",
            f"{r.ratio:.3f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [columns, *cells]) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [columns, *cells]
    )


def write_suite_json(path: str, rows: list[SuiteRow], memory: RssReport | None) -> None:
    """Save the suite's rows and memory check."""
    with open(path, "w") as out:
        json.dump(
            {
                "rows": [{"setting": r.setting, "ratio": r.ratio, **asdict(r.row)} for r in rows],
                "memory": asdict(memory) if memory is not None else None,
            },
            out,
            indent=2,
        )
