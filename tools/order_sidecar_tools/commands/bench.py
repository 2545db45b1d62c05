"""``order-sidecar bench``: measure a running sidecar, or the whole suite self-hosted."""

from __future__ import annotations

import argparse
import asyncio
import os

from order_sidecar.runtime.config import add_arguments, from_sources

from order_sidecar_tools.bench.chart import draw_chart
from order_sidecar_tools.bench.runner import BenchConfig, format_rows, run_bench, write_json
from order_sidecar_tools.bench.suite import format_result, run_suite, write_suite_json

HELP = "measure a running sidecar: unary, lease-round and batch events/s and latency"
DESCRIPTION = (
    "Publish through a running sidecar with unary Publish, then one lease round per event "
    "(AcquireLease, Publish, ReleaseLease), then PublishBatch, and print events/s with "
    "p50/p99 call latency. With --suite: start servers and sidecars and measure them side "
    "by side with raw NATS and gRPC baselines (publishing grid, consumers, open-loop "
    "latency, a 3-node cluster, memory after 1,000,000 entities; --suite-only picks groups)."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add bench's options."""
    add_arguments(parser, BenchConfig)


def run(args: argparse.Namespace) -> int:
    """Run the bench (or the suite) and print its table; 1 if any row failed."""
    config = from_sources(BenchConfig, args, os.environ)
    if config.suite:
        return _suite(config)
    rows = asyncio.run(run_bench(config))
    print(format_rows(config, rows))
    if config.json_out:
        write_json(config.json_out, config, rows)
    return 1 if any(row.failed for row in rows) else 0


def _suite(config: BenchConfig) -> int:
    result = asyncio.run(run_suite(config))
    print(format_result(result))
    if config.json_out:
        write_suite_json(config.json_out, result)
    if config.chart:
        draw_chart(config.chart, result.rows)
    return 1 if result.failed else 0
