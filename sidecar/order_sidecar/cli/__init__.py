"""The ``order-sidecar`` command: ``serve`` and ``verify``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from order_sidecar_tools.bench.chart import draw_chart
from order_sidecar_tools.bench.rss import format_rss
from order_sidecar_tools.bench.runner import BenchConfig, format_rows, run_bench, write_json
from order_sidecar_tools.bench.suite import format_suite, run_suite, write_suite_json
from order_sidecar_tools.demo import DemoConfig, run_demo

from order_sidecar import __version__
from order_sidecar.cli.dlq import add_dlq_parser, run_dlq
from order_sidecar.cli.status import StatusConfig, fetch_status, format_status
from order_sidecar.core.errors import SidecarError
from order_sidecar.jetstream.connection import connect_nats
from order_sidecar.jetstream.verify import format_json, format_table, verify_stream
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig, VerifyConfig, add_arguments, from_sources
from order_sidecar.runtime.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="order-sidecar",
        description="Publish entity change events to NATS JetStream in per-entity order.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC sidecar",
        description="Run the gRPC sidecar next to one producer replica. Every flag can also "
        "be set by its ORDER_SIDECAR_* env var.",
    )
    add_arguments(serve, ServeConfig)
    verify = commands.add_parser(
        "verify",
        help="check per-entity order in a stream; exit 1 on any violation",
        description="Read a stream and report, per entity type, events, entities, gaps, "
        "duplicates and inversions. Exit status 1 if any.",
    )
    add_arguments(verify, VerifyConfig)
    bench = commands.add_parser(
        "bench",
        help="measure a running sidecar: unary, lease-round and batch events/s and latency",
        description="Publish through a running sidecar with unary Publish, then one lease "
        "round per event (AcquireLease, Publish, ReleaseLease), then PublishBatch, and print "
        "events/s with p50/p99 call latency.",
    )
    add_arguments(bench, BenchConfig)
    demo = commands.add_parser(
        "demo",
        help="see the problem and the fix: naive replicas, then replicas through sidecars",
        description="On an embedded nats-server, run simulated producer replicas twice - "
        "publishing naively, then through sidecars - and print gaps, duplicates and "
        "inversions per run. Needs no other service.",
    )
    add_arguments(demo, DemoConfig)
    status = commands.add_parser(
        "status",
        help="print a running sidecar's state: backends, locks, queues, last errors",
        description="Ask a running sidecar (GetStatus) and print its state.",
    )
    add_arguments(status, StatusConfig)
    add_dlq_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve_config = from_sources(ServeConfig, args, os.environ)
            setup_logging(serve_config.log_level, serve_config.log_format)
            asyncio.run(SidecarApp(serve_config).run())
            return 0
        if args.command == "dlq":
            return run_dlq(args)
        if args.command == "status":
            status_config = from_sources(StatusConfig, args, os.environ)
            reply = asyncio.run(fetch_status(status_config))
            print(format_status(reply, status_config.json))
            return 0
        if args.command == "demo":
            demo_config = from_sources(DemoConfig, args, os.environ)
            logging.basicConfig(level=logging.WARNING)
            results = asyncio.run(run_demo(demo_config))
            return 1 if results[-1].report.violations else 0
        if args.command == "bench":
            bench_config = from_sources(BenchConfig, args, os.environ)
            if bench_config.suite:
                return _suite(bench_config)
            rows = asyncio.run(run_bench(bench_config))
            print(format_rows(bench_config, rows))
            if bench_config.json_out:
                write_json(bench_config.json_out, bench_config, rows)
            return 1 if any(row.failed for row in rows) else 0
        verify_config = from_sources(VerifyConfig, args, os.environ)
        return asyncio.run(_verify(verify_config))
    except SidecarError as error:
        print(f"order-sidecar: error: {error}", file=sys.stderr)
        return 2


def _suite(config: BenchConfig) -> int:
    rows, memory = asyncio.run(
        run_suite(config, config.numbers("suite_payloads"), config.numbers("suite_entities"))
    )
    print(format_suite(rows))
    if memory is not None:
        print(f"\nmemory of one sidecar (T5)\n{format_rss(memory)}")
    if config.json_out:
        write_suite_json(config.json_out, rows, memory)
    if config.chart:
        draw_chart(config.chart, rows)
    failed = any(item.row.failed for item in rows) or bool(memory and memory.failed)
    return 1 if failed else 0


async def _verify(config: VerifyConfig) -> int:
    nc = await connect_nats(config.nats_url, "order-sidecar verify")
    try:
        reports = await verify_stream(nc, config.stream)
    finally:
        await nc.close()
    print(format_json(reports) if config.json else format_table(reports))
    return 1 if any(report.violations for report in reports.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
