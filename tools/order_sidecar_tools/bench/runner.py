"""``order-sidecar bench``: load one running sidecar and print a table.

Runs unary ``Publish``, a lease round per event (``AcquireLease`` + ``Publish`` under
the lease + ``ReleaseLease``) and ``PublishBatch`` one after the other against the same
sidecar, each with a fresh set of entities, and reports events/s and per-call latency.
Timing lives here and never in tests: the machine is shared, so compare modes
measured side by side in one run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import grpc
from order_sidecar.core.errors import ConfigError
from order_sidecar.runtime.config import check_range, option
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc


@dataclass(frozen=True)
class BenchConfig:
    """Options of ``order-sidecar bench`` (flags and ORDER_SIDECAR_* env vars)."""

    target: str = option("127.0.0.1:50051", "sidecar to measure, host:port")
    events: int = option(5000, "events per mode")
    entities: int = option(100, "distinct entities the events are spread over")
    concurrency: int = option(64, "calls in flight")
    batch_size: int = option(100, "events per PublishBatch call")
    payload_bytes: int = option(256, "payload size in bytes")
    json_out: str = option("", "also write the results to this JSON file")
    suite: bool = option(
        False, "self-hosted suite: embedded NATS, raw NATS baselines, gRPC floor, 1 and 3 sidecars"
    )
    suite_payloads: str = option("256,10240", "payload sizes of the suite, comma-separated")
    suite_entities: str = option("1,100,1000,10000", "entity counts of the suite, comma-separated")
    suite_rss_entities: int = option(
        100_000, "with --suite: new entities written before a sidecar's RSS is read (0 skips)"
    )
    suite_redis_url: str = option(
        "", "with --suite: sidecars lock in this Redis (default: a NATS KV bucket)"
    )
    chart: str = option("", "with --suite: also draw the table to this PNG (needs matplotlib)")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option."""
        check_range("events", self.events, 1, 10_000_000)
        check_range("entities", self.entities, 1, 10_000_000)
        check_range("concurrency", self.concurrency, 1, 10_000)
        check_range("batch_size", self.batch_size, 1, 100_000)
        check_range("payload_bytes", self.payload_bytes, 0, 64 * 1024 * 1024)
        check_range("suite_rss_entities", self.suite_rss_entities, 0, 10_000_000)
        for name in ("suite_payloads", "suite_entities"):
            if not all(p.strip().isdigit() for p in getattr(self, name).split(",")):
                raise ConfigError(f"--{name.replace('_', '-')} must be comma-separated numbers")

    def numbers(self, name: str) -> list[int]:
        """A comma-separated option as numbers."""
        return [int(p) for p in getattr(self, name).split(",")]


@dataclass
class BenchRow:
    """One measured mode."""

    mode: str
    events: int
    failed: int
    seconds: float
    events_per_s: float
    call_p50_ms: float
    call_p99_ms: float
    first_error: str = ""


def _requests(config: BenchConfig, run: str) -> list[sidecar_pb2.PublishRequest]:
    payload = b"x" * config.payload_bytes
    return [
        sidecar_pb2.PublishRequest(
            entity_type="bench",
            entity_id=f"{run}-{n % config.entities}",
            operation=sidecar_pb2.OPERATION_UPDATE,
            payload=payload,
            idempotency_key=f"{run}-{n}",
        )
        for n in range(config.events)
    ]


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


async def _drive(
    calls: list[object], concurrency: int, send: object
) -> tuple[float, list[float], list[str]]:
    latencies: list[float] = []
    failures: list[str] = []
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            call = queue.pop()
            started = time.perf_counter()
            try:
                failures.extend(await send(call))  # type: ignore[operator]
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failures


async def run_bench(config: BenchConfig, targets: list[str] | None = None) -> list[BenchRow]:
    """Measure unary, lease-round and batch publishing against *config.target* (or spread
    over *targets*, one channel each, calls taken round robin)."""
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(t, options=options) for t in targets or [config.target]]
    try:
        return await _run_modes(config, [sidecar_pb2_grpc.SidecarStub(c) for c in channels])
    finally:
        for channel in channels:
            await channel.close()


async def _run_modes(
    config: BenchConfig, stubs: list[sidecar_pb2_grpc.SidecarAsyncStub]
) -> list[BenchRow]:
    rows = []
    turn = itertools.cycle(stubs)

    async def unary(request: object) -> list[str]:
        await next(turn).Publish(request, timeout=30)  # type: ignore[arg-type]
        return []

    async def batch(events: object) -> list[str]:
        reply = await next(turn).PublishBatch(
            sidecar_pb2.PublishBatchRequest(events=events),  # type: ignore[arg-type]
            timeout=60,
        )
        return [result.message for result in reply.results if result.code != 0]

    async def lease_round(request: object) -> list[str]:
        event: sidecar_pb2.PublishRequest = request  # type: ignore[assignment]
        ask = sidecar_pb2.AcquireLeaseRequest(
            entity_type=event.entity_type, entity_id=event.entity_id
        )
        ask.wait_timeout.FromSeconds(10)
        stub = next(turn)
        lease = await stub.AcquireLease(ask, timeout=30)
        event.lease_id = lease.lease_id
        try:
            await stub.Publish(event, timeout=30)
        finally:
            await stub.ReleaseLease(
                sidecar_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=30
            )
        return []

    run = uuid.uuid4().hex[:8]
    unary_calls: list[object] = list(_requests(config, f"u{run}"))
    seconds, latencies, failures = await _drive(unary_calls, config.concurrency, unary)
    rows.append(_row("Publish (unary)", config.events, failures, seconds, latencies))
    lease_calls: list[object] = list(_requests(config, f"l{run}"))
    seconds, latencies, failures = await _drive(lease_calls, config.concurrency, lease_round)
    mode = "lease round (acquire+publish+release)"
    rows.append(_row(mode, config.events, failures, seconds, latencies))
    rows.append(await stream_mode(config, stubs[0], f"s{run}"))
    events = _requests(config, f"b{run}")
    batches: list[object] = [
        events[i : i + config.batch_size] for i in range(0, len(events), config.batch_size)
    ]
    in_flight = max(1, min(config.concurrency, len(batches)))
    seconds, latencies, failures = await _drive(batches, in_flight, batch)
    mode = f"PublishBatch ({config.batch_size}/call)"
    rows.append(_row(mode, config.events, failures, seconds, latencies))
    return rows


async def stream_mode(
    config: BenchConfig, stub: sidecar_pb2_grpc.SidecarAsyncStub, run: str
) -> BenchRow:
    """All events over one PublishStream; latency from sending an event to its result."""
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    failures: list[str] = []

    async def requests() -> AsyncIterator[sidecar_pb2.PublishStreamRequest]:
        for number, request in enumerate(_requests(config, run)):
            sent_at[str(number)] = time.perf_counter()
            yield sidecar_pb2.PublishStreamRequest(tag=str(number), event=request)

    started = time.perf_counter()
    answered = 0
    try:
        async for response in stub.PublishStream(requests()):
            answered += 1
            latencies.append(time.perf_counter() - sent_at.pop(response.tag))
            if response.result.code != 0:
                failures.append(response.result.message)
    except grpc.aio.AioRpcError as error:
        failures.extend([f"{error.code().name}: {error.details()}"] * (config.events - answered))
    seconds = time.perf_counter() - started
    return _row("PublishStream", config.events, failures, seconds, latencies)


def _row(
    mode: str, events: int, failures: list[str], seconds: float, latencies: list[float]
) -> BenchRow:
    return BenchRow(
        mode=mode,
        events=events,
        failed=len(failures),
        first_error=failures[0] if failures else "",
        seconds=round(seconds, 3),
        events_per_s=round(events / seconds, 1),
        call_p50_ms=round(percentile(latencies, 0.50), 2),
        call_p99_ms=round(percentile(latencies, 0.99), 2),
    )


def format_rows(config: BenchConfig, rows: list[BenchRow]) -> str:
    """The result table, with the run's parameters above it."""
    head = (
        f"target {config.target}: {config.events} events over {config.entities} entities, "
        f"{config.payload_bytes} B payloads, {config.concurrency} calls in flight"
    )
    columns = ["mode", "events", "failed", "seconds", "events/s", "p50 ms", "p99 ms"]
    cells = [
        [
            r.mode,
            str(r.events),
            str(r.failed),
            f"{r.seconds:.2f}",
            f"{r.events_per_s:.0f}",
            f"{r.call_p50_ms:.2f}",
            f"{r.call_p99_ms:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [columns, *cells]) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [columns, *cells]
    ]
    errors = [f"{r.mode}: first error: {r.first_error}" for r in rows if r.first_error]
    return "\n".join([head, *lines, *errors])


def write_json(path: str, config: BenchConfig, rows: list[BenchRow]) -> None:
    """Save the run for later comparison."""
    with open(path, "w") as out:
        json.dump({"config": asdict(config), "rows": [asdict(r) for r in rows]}, out, indent=2)
