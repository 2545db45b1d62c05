"""``order-sidecar bench --suite``: the sidecar against the broker's own speed, in one run.

On one embedded nats-server (and, for its rows, a 3-node cluster) it measures, side by
side, in row groups (``--suite-only`` picks some; default all, in this order):

- ``grid`` (T1-T4): raw nats-py publish awaiting each ack and pipelined with 64 in
  flight, a bare grpc.aio echo, and sidecar processes (nats-kv locks, or Redis with
  ``--suite-redis-url``) with unary ``Publish``, a lease round, ``PublishStream`` and
  ``PublishBatch``, per payload size and entity count, with 1 sidecar and with 3
  (each sidecar's share of the events);
- ``consumer`` (T6): a raw pull consumer and the ordered consumer with 1 and 3 replicas;
- ``latency`` (T7): unary ``Publish``, raw publish and the echo at a fixed open-loop rate;
- ``cluster``: raw pipelined publish and one sidecar's ``PublishBatch`` on an R3 stream;
- ``memory`` (T5): one sidecar's RSS after 1,000,000 new entities.

Every row carries its ratio to its group's baseline; the target lines divide the rows
each target compares.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from order_sidecar.jetstream.embedded import EmbeddedNats, free_port

from order_sidecar_tools.bench.cluster import run_cluster
from order_sidecar_tools.bench.consumers import run_consumers
from order_sidecar_tools.bench.grid import run_grid
from order_sidecar_tools.bench.latency import run_latency
from order_sidecar_tools.bench.processes import Child
from order_sidecar_tools.bench.rows import SuiteContext, SuiteRow, progress
from order_sidecar_tools.bench.rss import RssReport, format_rss, measure_rss
from order_sidecar_tools.bench.runner import BenchConfig, BenchRow
from order_sidecar_tools.bench.targets import TargetLine, target_lines

Group = Callable[[SuiteContext], Awaitable[list[SuiteRow]]]
_ROW_GROUPS: dict[str, Group] = {
    "grid": run_grid,
    "consumer": run_consumers,
    "latency": run_latency,
    "cluster": run_cluster,
}


@dataclass
class SuiteResult:
    """Everything one suite run measured."""

    groups: list[str]
    rows: list[SuiteRow] = field(default_factory=list)
    memory: RssReport | None = None
    targets: list[TargetLine] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether any row (or the memory check) had a failed event."""
        return any(r.row.failed for r in self.rows) or bool(self.memory and self.memory.failed)


async def run_suite(config: BenchConfig) -> SuiteResult:
    """The chosen row groups, side by side on one NATS server; then the target lines."""
    started = time.monotonic()
    result = SuiteResult(config.groups())
    with tempfile.TemporaryDirectory(prefix="order-sidecar-bench-") as scratch:
        server = EmbeddedNats(Path(scratch) / "nats")
        url = await server.start()
        echo_port = free_port()
        echo = Child(["order_sidecar_tools.bench.processes", str(echo_port)], echo_port)
        try:
            await echo.wait_ready(health=False)
            ctx = SuiteContext(config, url, echo.target, Path(scratch))
            for group in result.groups:
                if group in _ROW_GROUPS:
                    result.rows.extend(await _ROW_GROUPS[group](ctx))
                elif config.suite_rss_entities:
                    result.memory = await _memory(ctx)
                    result.rows.append(memory_row(result.memory))
        finally:
            echo.stop()
            server.stop()
    result.targets = target_lines(config, result.rows, result.memory)
    result.seconds = round(time.monotonic() - started, 1)
    return result


async def _memory(ctx: SuiteContext) -> RssReport:
    entities = ctx.config.suite_rss_entities
    progress(f"memory: {entities} new entities, 1 sidecar")
    return await measure_rss(ctx.url, entities, ctx.config.suite_redis_url)


def memory_row(memory: RssReport) -> SuiteRow:
    """The memory check's publishing as a table row."""
    mode = f"PublishBatch ({memory.batch_events}/call, {memory.batches_in_flight} in flight)"
    row = BenchRow(
        mode=mode,
        events=memory.entities,
        failed=memory.failed,
        seconds=memory.seconds,
        events_per_s=memory.events_per_s,
        call_p50_ms=memory.call_p50_ms,
        call_p99_ms=memory.call_p99_ms,
    )
    return SuiteRow(f"256 B, {memory.entities} new ent, 1 sc (T5)", row, group="memory")


COLUMNS = [
    "setting",
    "mode",
    "events",
    "failed",
    "events/s",
    "p50 ms",
    "p99 ms",
    "ratio",
    "baseline",
    "sidecar shares",
]


def _cells(r: SuiteRow) -> list[str]:
    timed = r.row.call_p50_ms or r.row.call_p99_ms
    return [
        r.setting,
        r.row.mode,
        str(r.row.events),
        str(r.row.failed),
        f"{r.row.events_per_s:.0f}",
        f"{r.row.call_p50_ms:.2f}" if timed else "-",
        f"{r.row.call_p99_ms:.2f}" if timed else "-",
        f"{r.ratio:.3f}" if r.ratio is not None else "-",
        r.baseline or "-",
        "/".join(f"{s:.2f}" for s in r.row.shares) or "-",
    ]


def format_suite(rows: list[SuiteRow]) -> str:
    """The suite's one table: every group's rows, each with its ratio and baseline."""
    cells = [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    left = {0, 1, 8, 9}
    return "\n".join(
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [COLUMNS, *cells]
    )


def format_result(result: SuiteResult) -> str:
    """The table, the target lines, the memory check and the run's length."""
    parts = [format_suite(result.rows)]
    parts.append(
        "targets (ratio = measured / baseline, both from this run)\n"
        + "\n".join(line.text for line in result.targets)
    )
    if result.memory is not None:
        parts.append(f"memory of one sidecar (T5)\n{format_rss(result.memory)}")
    parts.append(f"suite: groups {','.join(result.groups)} in {result.seconds:.0f} s")
    return "\n\n".join(parts)


def write_suite_json(path: str, result: SuiteResult) -> None:
    """Save the suite's rows, target lines and memory check."""
    rows = [
        {
            "group": r.group,
            "setting": r.setting,
            "ratio": r.ratio,
            "baseline": r.baseline,
            **asdict(r.row),
        }
        for r in result.rows
    ]
    with open(path, "w") as out:
        json.dump(
            {
                "groups": result.groups,
                "seconds": result.seconds,
                "rows": rows,
                "targets": [asdict(t) for t in result.targets],
                "memory": asdict(result.memory) if result.memory is not None else None,
            },
            out,
            indent=2,
        )
