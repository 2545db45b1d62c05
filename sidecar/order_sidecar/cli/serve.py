"""``order-sidecar serve``: run the gRPC sidecar next to one producer replica."""

from __future__ import annotations

import argparse
import asyncio
import os

from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig, add_arguments, from_sources
from order_sidecar.telemetry.logs import setup_logging

HELP = "run the gRPC sidecar"
DESCRIPTION = (
    "Run the gRPC sidecar next to one producer replica. Every flag can also be set by its "
    "ORDER_SIDECAR_* env var."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add serve's options."""
    add_arguments(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    config = from_sources(ServeConfig, args, os.environ)
    setup_logging(config.log_level, config.log_format)
    asyncio.run(SidecarApp(config).run())
    return 0
