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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

import grpc
from order_sidecar.core.errors import ConfigError
from order_sidecar.runtime.config import check_range, option
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

SUITE_GROUPS = ("grid", "consumer", "latency", "cluster", "memory")
"""The suite's row groups, in the order they run (``--suite-only`` names some of them);
memory runs last: it leaves a million entities in the server."""


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
        1_000_000,
        "with --suite: new entities written (PublishBatch) before a sidecar's RSS is read "
        "(0 skips the memory check)",
    )
    suite_only: str = option(
        "",
        "with --suite: run only these row groups, comma-separated, of "
        f"{','.join(SUITE_GROUPS)} (default: all)",
    )
    suite_latency_rate: float = option(
        100.0, "with --suite: calls/s of the open-loop latency rows (T7)"
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
        check_range("suite_latency_rate", self.suite_latency_rate, 1.0, 10_000.0)
        unknown = self._named_groups() - set(SUITE_GROUPS)
        if unknown:
            raise ConfigError(
                f"--suite-only: unknown group(s) {', '.join(sorted(unknown))}; "
                f"choose from {', '.join(SUITE_GROUPS)}"
            )
        for name in ("suite_payloads", "suite_entities"):
            if not all(p.strip().isdigit() for p in getattr(self, name).split(",")):
                raise ConfigError(f"--{name.replace('_', '-')} must be comma-separated numbers")

    def numbers(self, name: str) -> list[int]:
        """A comma-separated option as numbers."""
        return [int(p) for p in getattr(self, name).split(",")]

    def groups(self) -> list[str]:
        """The suite's row groups to run, in their order: ``--suite-only``'s, else all."""
        named = self._named_groups()
        return [group for group in SUITE_GROUPS if not named or group in named]

    def _named_groups(self) -> set[str]:
        return {part.strip() for part in self.suite_only.split(",") if part.strip()}


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
    shares: list[float] = field(default_factory=list)
    """With several sidecars: each one's part of the events it published in this mode."""


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
    """The *fraction* quantile of *samples* (seconds), in milliseconds."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


Send = Callable[[object], Awaitable[list[str]]]
"""One call of a mode: its failures (empty when every event went through)."""


async def drive(
    calls: list[object], concurrency: int, send: Send
) -> tuple[float, list[float], list[str]]:
    """Run *calls* through *send* with *concurrency* in flight (closed loop): the seconds
    taken, each call's latency and every failure."""
    latencies: list[float] = []
    failures: list[str] = []
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            call = queue.pop()
            started = time.perf_counter()
            try:
                failures.extend(await send(call))
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failures


async def run_bench(
    config: BenchConfig, targets: list[str] | None = None, lease_events: int = 0
) -> list[BenchRow]:
    """Measure unary, lease-round and batch publishing against *config.target* (or spread
    over *targets*, one channel each, calls taken round robin); lease rounds publish
    *lease_events* events (0: as many as the other modes)."""
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    channels = [grpc.aio.insecure_channel(t, options=options) for t in targets or [config.target]]
    stubs = [sidecar_pb2_grpc.SidecarStub(c) for c in channels]
    try:
        return await _run_modes(config, stubs, lease_events or config.events)
    finally:
        for channel in channels:
            await channel.close()


async def run_batch_mode(config: BenchConfig, target: str) -> BenchRow:
    """Only ``PublishBatch`` (``config.batch_size`` events a call) against *target*."""
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        modes = _Modes(config, [sidecar_pb2_grpc.SidecarStub(channel)])
        return await modes.batches(_requests(config, f"b{uuid.uuid4().hex[:8]}"))


async def _run_modes(
    config: BenchConfig, stubs: list[sidecar_pb2_grpc.SidecarAsyncStub], lease_events: int
) -> list[BenchRow]:
    modes = _Modes(config, stubs)
    run = uuid.uuid4().hex[:8]
    rows = [
        await modes.closed_loop("Publish (unary)", _requests(config, f"u{run}"), modes.unary),
        await modes.closed_loop(
            "lease round (acquire+publish+release)",
            _requests(config, f"l{run}")[:lease_events],
            modes.lease_round,
        ),
    ]
    before = await published_counts(stubs)
    stream_row = await stream_mode(config, stubs[0], f"s{run}")
    stream_row.shares = shares_since(before, await published_counts(stubs))
    rows.append(stream_row)
    rows.append(await modes.batches(_requests(config, f"b{run}")))
    return rows


class _Modes:
    """The publishing modes of one bench run, each call to the next sidecar in turn."""

    def __init__(self, config: BenchConfig, stubs: list[sidecar_pb2_grpc.SidecarAsyncStub]) -> None:
        self.config = config
        self.stubs = stubs
        self.turn = itertools.cycle(stubs)

    async def closed_loop(
        self, mode: str, calls: Sequence[object], send: Send, events: int = 0
    ) -> BenchRow:
        """*calls* with the configured calls in flight; each sidecar's share of the events."""
        before = await published_counts(self.stubs)
        in_flight = max(1, min(self.config.concurrency, len(calls)))
        seconds, latencies, failures = await drive(list(calls), in_flight, send)
        row = make_row(mode, events or len(calls), failures, seconds, latencies)
        row.shares = shares_since(before, await published_counts(self.stubs))
        return row

    async def batches(self, events: list[sidecar_pb2.PublishRequest]) -> BenchRow:
        """*events* in PublishBatch calls of the configured size."""
        size = self.config.batch_size
        calls = [events[i : i + size] for i in range(0, len(events), size)]
        return await self.closed_loop(f"PublishBatch ({size}/call)", calls, self.batch, len(events))

    async def unary(self, request: object) -> list[str]:
        """One Publish."""
        await next(self.turn).Publish(request, timeout=30)  # type: ignore[arg-type]
        return []

    async def batch(self, events: object) -> list[str]:
        """One PublishBatch; the failed events' messages."""
        reply = await next(self.turn).PublishBatch(
            sidecar_pb2.PublishBatchRequest(events=events),  # type: ignore[arg-type]
            timeout=60,
        )
        return [result.message for result in reply.results if result.code != 0]

    async def lease_round(self, request: object) -> list[str]:
        """AcquireLease, Publish under it, ReleaseLease, on one sidecar."""
        event: sidecar_pb2.PublishRequest = request  # type: ignore[assignment]
        ask = sidecar_pb2.AcquireLeaseRequest(
            entity_type=event.entity_type, entity_id=event.entity_id
        )
        ask.wait_timeout.FromSeconds(10)
        stub = next(self.turn)
        lease = await stub.AcquireLease(ask, timeout=30)
        event.lease_id = lease.lease_id
        try:
            await stub.Publish(event, timeout=30)
        finally:
            await stub.ReleaseLease(
                sidecar_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=30
            )
        return []


async def published_counts(stubs: list[sidecar_pb2_grpc.SidecarAsyncStub]) -> list[int]:
    """Each sidecar's count of published events (its GetStatus), when there are several."""
    if len(stubs) < 2:
        return []
    statuses = await asyncio.gather(
        *(stub.GetStatus(sidecar_pb2.GetStatusRequest(), timeout=10) for stub in stubs)
    )
    return [int(status.published) for status in statuses]


def shares_since(before: list[int], after: list[int]) -> list[float]:
    """Each sidecar's part of the events published between two counts (empty: one sidecar,
    or none counted)."""
    done = [now - then for then, now in zip(before, after, strict=True)]
    total = sum(done)
    return [round(part / total, 3) for part in done] if total > 0 else []


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
    return make_row("PublishStream", config.events, failures, seconds, latencies)


def make_row(
    mode: str, events: int, failures: list[str], seconds: float, latencies: list[float]
) -> BenchRow:
    """A measured mode: *events* in *seconds*, with its calls' latencies and failures."""
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
