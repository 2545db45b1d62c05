"""``order-sidecar demo``: the problem and the fix, side by side, on an embedded NATS.

Several simulated producer replicas (each with its own NATS connection and concurrent
tasks) write events for a set of shared entities, twice:

1. naively: each event takes its number from the shared "database" (the commit order)
   and is published straight to JetStream, so replicas race;
2. through sidecars: each replica calls its own sidecar (nats-kv locks, no Redis).

After each run the stream is checked as ``order-sidecar verify`` does, and a table and a
verdict are printed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig
from order_sidecar.jetstream.embedded import EmbeddedNats
from order_sidecar.jetstream.verify import TypeReport, verify_stream
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig, check_range, option
from order_sidecar_client import contract

ENTITY_TYPE = "patient"


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``order-sidecar demo``."""

    producers: int = option(4, "simulated producer replicas")
    tasks: int = option(8, "concurrent writers in each replica")
    sidecars: int = option(2, "sidecars in the second run (replicas share them round robin)")
    entities: int = option(20, "shared entities")
    events: int = option(2000, "events per run")
    data_dir: str = option("", "embedded nats-server data folder (default: a temporary one)")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option."""
        check_range("producers", self.producers, 1, 64)
        check_range("tasks", self.tasks, 1, 256)
        check_range("sidecars", self.sidecars, 1, 16)
        check_range("entities", self.entities, 1, 1_000_000)
        check_range("events", self.events, 1, 1_000_000)


@dataclass
class RunResult:
    """What one run put in its stream."""

    name: str
    report: TypeReport
    seconds: float

    @property
    def events_per_s(self) -> float:
        """Throughput of the run."""
        return self.report.events / self.seconds if self.seconds else 0.0


class Progress:
    """A one-line progress counter on stderr."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, total, 0

    async def show(self) -> None:
        """Redraw until cancelled."""
        while True:
            print(f"\r{self.name}: {self.done}/{self.total} events", end="", file=sys.stderr)
            await asyncio.sleep(0.25)

    def finish(self) -> None:
        """Leave the final count on its own line."""
        print(f"\r{self.name}: {self.done}/{self.total} events", file=sys.stderr)


async def _produce(
    config: DemoConfig, progress: Progress, publish: Callable[[int, str], Awaitable[None]]
) -> None:
    per_writer = _split(config.events, config.producers * config.tasks)

    async def writer(replica: int, count: int) -> None:
        for _ in range(count):
            await publish(replica, f"e{random.randrange(config.entities)}")
            progress.done += 1

    await asyncio.gather(*(writer(n // config.tasks, count) for n, count in enumerate(per_writer)))


async def naive_run(config: DemoConfig, url: str) -> RunResult:
    """Replicas stamp from a shared counter and publish straight to JetStream."""
    connections = [await nats.connect(url) for _ in range(config.producers)]
    await (
        connections[0]
        .jetstream()
        .add_stream(StreamConfig(name="DEMO_NAIVE", subjects=["demo-naive.>"]))
    )
    committed: dict[str, int] = {}

    async def publish(replica: int, entity_id: str) -> None:
        committed[entity_id] = sequence = committed.get(entity_id, 0) + 1  # the DB commit
        await asyncio.sleep(random.uniform(0, 0.002))  # the replica's own work meanwhile
        headers = {
            contract.HEADER_ENTITY_TYPE: ENTITY_TYPE,
            contract.HEADER_ENTITY_ID: entity_id,
            contract.HEADER_ENTITY_SEQUENCE: str(sequence),
            contract.HEADER_ENTITY_OPERATION: "update",
        }
        subject = contract.subject_for("demo-naive", ENTITY_TYPE, entity_id, 16)
        await connections[replica].jetstream().publish(subject, b"{}", headers=headers)

    result = await _timed_run("naive publishing", config, publish, connections[0], "DEMO_NAIVE")
    for connection in connections:
        await connection.close()
    return result


async def sidecar_run(config: DemoConfig, url: str) -> RunResult:
    """Replicas call sidecars, which take nats-kv locks and fence every publish."""
    from order_sidecar_client import AsyncSidecarClient, Event

    base = ServeConfig(
        nats_url=url,
        stream="DEMO_SIDECAR",
        subject_prefix="demo-sidecar",
        listen="127.0.0.1:0",
        metrics_listen="",
        lock_bucket="DEMO_LOCKS",
    )
    apps = [SidecarApp(replace(base, producer_id=f"sidecar-{n}")) for n in range(config.sidecars)]
    for app in apps:
        await app.start()
    clients = [AsyncSidecarClient(apps[n % len(apps)].target) for n in range(config.producers)]

    async def publish(replica: int, entity_id: str) -> None:
        await clients[replica].publish(Event(ENTITY_TYPE, entity_id, "update", b"{}"))

    checker = await nats.connect(url)
    try:
        return await _timed_run("through sidecars", config, publish, checker, "DEMO_SIDECAR")
    finally:
        await checker.close()
        for client in clients:
            await client.close()
        for app in apps:
            await app.stop()


async def _timed_run(
    name: str,
    config: DemoConfig,
    publish: Callable[[int, str], Awaitable[None]],
    nc: NatsClient,
    stream: str,
) -> RunResult:
    progress = Progress(name, config.events)
    ticker = asyncio.ensure_future(progress.show())
    started = time.perf_counter()
    try:
        await _produce(config, progress, publish)
    finally:
        ticker.cancel()
        progress.finish()
    seconds = time.perf_counter() - started
    report = (await verify_stream(nc, stream)).get(ENTITY_TYPE, TypeReport())
    return RunResult(name, report, seconds)


async def run_demo(config: DemoConfig) -> list[RunResult]:
    """Both runs on one embedded nats-server; each run's table is printed as it ends."""
    print(
        f"{config.producers} producer replicas x {config.tasks} writers, "
        f"{config.entities} shared entities, {config.events} events per run",
        flush=True,
    )
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="order-sidecar-demo-") as scratch:
        server = EmbeddedNats(Path(config.data_dir or scratch))
        url = await server.start()
        print(f"embedded nats-server on {url}, data in {server.data_dir}", file=sys.stderr)
        try:
            for run in (naive_run, sidecar_run):
                results.append(await run(config, url))
                print(format_table(results[-1]), flush=True)
        finally:
            server.stop()
    print("\n" + verdict(results))
    return results


def format_table(result: RunResult) -> str:
    """One run's table."""
    report = result.report
    columns = ["run", "events", "entities", "gaps", "duplicates", "inversions", "events/s"]
    row = [
        result.name,
        str(report.events),
        str(report.entities),
        str(report.gaps),
        str(report.duplicates),
        str(report.inversions),
        f"{result.events_per_s:.0f}",
    ]
    widths = [max(len(a), len(b)) for a, b in zip(columns, row, strict=True)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in (columns, row)
    ]
    return "\n" + "\n".join(lines)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


def verdict(results: list[RunResult]) -> str:
    """One line: what went wrong without sidecars, and whether the sidecars kept order."""
    naive, fixed = results
    out_of_order = naive.report.violations
    share = 100.0 * out_of_order / max(1, naive.report.events)
    if fixed.report.violations:
        return f"verdict: FAILED - {fixed.report.violations} violations through sidecars"
    return (
        f"verdict: naive publishing broke per-entity order {out_of_order} times "
        f"({share:.1f}% of events); through sidecars every entity is in order"
    )
