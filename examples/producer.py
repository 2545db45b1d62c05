#!/usr/bin/env python3
"""A tiny producer replica for the Docker Compose and Kubernetes examples.

It plays the seed's scenario: several replicas of one service change the *same* entities
and publish each change through the sidecar next to them (127.0.0.1:50051, the sidecar
shares the replica's network namespace). Run two of them against one stream and
``order-sidecar verify`` finds every entity in order.

    python examples/producer.py --target 127.0.0.1:50051 --entities 20 --rate 10

Every option is also an env var (``PRODUCER_*``), as the deployments configure it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import FrameType

from order_sidecar_client import Event, SidecarClient, SidecarError

log = logging.getLogger("producer")


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> argparse.Namespace:
    """Flags first, then ``PRODUCER_*`` env vars, then defaults."""
    parser = argparse.ArgumentParser(description="Publish entity changes through a sidecar.")
    parser.add_argument(
        "--target",
        default=env.get("PRODUCER_TARGET", "127.0.0.1:50051"),
        help="the sidecar, host:port [env PRODUCER_TARGET]",
    )
    parser.add_argument(
        "--entity-type",
        default=env.get("PRODUCER_ENTITY_TYPE", "patient"),
        help="entity type to publish [env PRODUCER_ENTITY_TYPE]",
    )
    parser.add_argument(
        "--entities",
        type=int,
        default=int(env.get("PRODUCER_ENTITIES", "20")),
        help="ids 1..N shared with the other replicas [env PRODUCER_ENTITIES]",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=float(env.get("PRODUCER_RATE", "10")),
        help="events per second [env PRODUCER_RATE]",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=int(env.get("PRODUCER_COUNT", "0")),
        help="stop after this many events; 0: until SIGTERM [env PRODUCER_COUNT]",
    )
    parser.add_argument(
        "--name",
        default=env.get("PRODUCER_NAME", socket.gethostname()),
        help="this replica's name, put in each payload [env PRODUCER_NAME]",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    """Publish until *stop* is set or ``--count`` events are out; returns events published."""
    published = 0
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    with SidecarClient(args.target) as sidecar:
        while not stop.is_set() and (args.count == 0 or published < args.count):
            entity_id = str(random.randint(1, args.entities))
            payload = json.dumps({"by": args.name, "n": published, "at": time.time()})
            try:
                # The client retries UNAVAILABLE/ABORTED with the event's idempotency key,
                # so a retried event lands once.
                result = sidecar.publish(
                    Event(args.entity_type, entity_id, "update", payload.encode())
                )
            except SidecarError as error:
                log.warning("%s/%s not published: %s", args.entity_type, entity_id, error)
            else:
                published += 1
                log.info(
                    "%s %s/%s seq %d", result.subject, args.entity_type, entity_id, result.sequence
                )
            # Pacing, not synchronisation: returns at once on SIGTERM.
            stop.wait(interval)
    return published


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv, os.environ)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    published = run(args, stop)
    log.info("stopped after %d events", published)
    return 0


if __name__ == "__main__":
    sys.exit(main())
