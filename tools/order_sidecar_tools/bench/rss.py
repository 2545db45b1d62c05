"""The suite's memory check (target T5): a sidecar's RSS after many distinct entities.

One sidecar process writes one event to each of N new entities (1,000,000 by default),
in ``PublishBatch`` calls of 1,000 events with 8 calls in flight; its resident set is
read from /proc before, right after, and once every lock it kept has been let go (its
per-entity gates freed; only the bounded position hints remain).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar_tools.bench.processes import start_sidecars
from order_sidecar_tools.bench.runner import BenchRow, drive, make_row

_IDLE_DEADLINE = 60.0
BATCH_EVENTS = 1000
"""Events per PublishBatch call of the memory check (the sidecar's --max-batch)."""
BATCHES_IN_FLIGHT = 8


@dataclass
class RssReport:
    """Memory of one sidecar process around a run over many entities."""

    entities: int
    events_per_s: float
    seconds: float
    batch_events: int
    batches_in_flight: int
    call_p50_ms: float
    call_p99_ms: float
    rss_start_mb: float
    rss_loaded_mb: float
    rss_idle_mb: float
    locks_held_idle: int
    entities_busy_idle: int
    failed: int


def rss_mb(pid: int) -> float:
    """Resident set size of process *pid*, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


async def measure_rss(url: str, entities: int, redis_url: str = "") -> RssReport:
    """Write one event to each of *entities* new entities through one sidecar process."""
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    (child,) = await start_sidecars(url, 1, name, redis_url)
    pid = child.process.pid
    try:
        start = rss_mb(pid)
        async with grpc.aio.insecure_channel(child.target) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            row = await _write_entities(stub, entities, f"m{name[-8:]}")
            loaded = rss_mb(pid)
            status = await _wait_idle(stub)
        return RssReport(
            entities=entities,
            events_per_s=row.events_per_s,
            seconds=row.seconds,
            batch_events=BATCH_EVENTS,
            batches_in_flight=BATCHES_IN_FLIGHT,
            call_p50_ms=row.call_p50_ms,
            call_p99_ms=row.call_p99_ms,
            rss_start_mb=start,
            rss_loaded_mb=loaded,
            rss_idle_mb=rss_mb(pid),
            locks_held_idle=status.locks_held,
            entities_busy_idle=status.entities_busy,
            failed=row.failed,
        )
    finally:
        child.stop()


async def _write_entities(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, entities: int, run: str
) -> BenchRow:
    """One event to each entity, a batch's requests built only when it is sent."""
    payload = b"x" * 256

    async def send(first: object) -> list[str]:
        start: int = first  # type: ignore[assignment]
        events = [
            sidecar_pb2.PublishRequest(
                entity_type="bench",
                entity_id=f"{run}-{n}",
                operation=sidecar_pb2.OPERATION_CREATE,
                payload=payload,
                idempotency_key=f"{run}-{n}",
            )
            for n in range(start, min(start + BATCH_EVENTS, entities))
        ]
        reply = await stub.PublishBatch(sidecar_pb2.PublishBatchRequest(events=events), timeout=120)
        return [result.message for result in reply.results if result.code != 0]

    firsts: list[object] = list(range(0, entities, BATCH_EVENTS))
    seconds, latencies, failures = await drive(firsts, BATCHES_IN_FLIGHT, send)
    mode = f"PublishBatch ({BATCH_EVENTS}/call, {BATCHES_IN_FLIGHT} in flight)"
    return make_row(mode, entities, failures, seconds, latencies)


async def _wait_idle(stub: sidecar_pb2_grpc.SidecarAsyncStub) -> sidecar_pb2.SidecarStatus:
    """The sidecar's status once it holds no lock (lingering locks let go), or at the
    deadline."""
    deadline = time.monotonic() + _IDLE_DEADLINE
    while True:
        status: sidecar_pb2.SidecarStatus = await stub.GetStatus(
            sidecar_pb2.GetStatusRequest(), timeout=10
        )
        if (status.locks_held == 0 and status.entities_busy == 0) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


def format_rss(report: RssReport) -> str:
    """Two lines: header and values."""
    columns = {
        "entities": str(report.entities),
        "failed": str(report.failed),
        "events/s": f"{report.events_per_s:.0f}",
        "RSS start MB": f"{report.rss_start_mb:.1f}",
        "RSS loaded MB": f"{report.rss_loaded_mb:.1f}",
        "RSS idle MB": f"{report.rss_idle_mb:.1f}",
        "locks held idle": str(report.locks_held_idle),
        "busy idle": str(report.entities_busy_idle),
    }
    widths = [max(len(k), len(v)) for k, v in columns.items()]
    head = "  ".join(k.rjust(w) for k, w in zip(columns, widths, strict=True))
    values = "  ".join(v.rjust(w) for v, w in zip(columns.values(), widths, strict=True))
    return f"{head}\n{values}"
