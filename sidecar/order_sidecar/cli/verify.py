"""``order-sidecar verify``: check per-entity order in a stream; exit 1 on any violation."""

from __future__ import annotations

import argparse
import asyncio
import os

from order_sidecar.jetstream.connection import connect_nats
from order_sidecar.jetstream.verify import format_json, format_table, verify_stream
from order_sidecar.runtime.config import VerifyConfig, add_arguments, from_sources

HELP = "check per-entity order in a stream; exit 1 on any violation"
DESCRIPTION = (
    "Read a stream and report, per entity type, events, entities, gaps, duplicates and "
    "inversions. Exit status 1 if any."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add verify's options."""
    add_arguments(parser, VerifyConfig)


def run(args: argparse.Namespace) -> int:
    """Read the whole stream and print its report."""
    return asyncio.run(_verify(from_sources(VerifyConfig, args, os.environ)))


async def _verify(config: VerifyConfig) -> int:
    nc = await connect_nats(config.nats_url, "order-sidecar verify")
    try:
        reports = await verify_stream(nc, config.stream)
    finally:
        await nc.close()
    print(format_json(reports) if config.json else format_table(reports))
    return 1 if any(report.violations for report in reports.values()) else 0
