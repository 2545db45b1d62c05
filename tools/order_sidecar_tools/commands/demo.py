"""``order-sidecar demo``: naive replicas, then replicas through sidecars, side by side."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from order_sidecar.runtime.config import add_arguments, from_sources

from order_sidecar_tools.demo import DemoConfig, run_demo

HELP = "see the problem and the fix: naive replicas, then replicas through sidecars"
DESCRIPTION = (
    "On an embedded nats-server, run simulated producer replicas twice - publishing "
    "naively, then through sidecars - and print gaps, duplicates and inversions per run. "
    "Needs no other service."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add demo's options."""
    add_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    """Run both demo runs; 1 if the sidecar run broke order."""
    config = from_sources(DemoConfig, args, os.environ)
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(run_demo(config))
    return 1 if results[-1].report.violations else 0
