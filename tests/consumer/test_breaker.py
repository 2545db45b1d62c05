"""The circuit breaker against a failing HTTP server on loopback.

While the server fails, the breaker opens, the consumer stops pulling and holds its
events (no redelivery is spent, nothing reaches the DLQ, the server sees only trial
calls); once the server recovers the breaker closes and every event applies in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar_client.consumer import BreakerState, CircuitBreaker, EntityEvent, list_dead

from tests.support.consumer import (
    check_applies,
    create_stream,
    in_order,
    make_consumer,
    publish,
    running,
    wait_for,
)

PARTITIONS = 4


class Downstream(ThreadingHTTPServer):
    """Answers 500 while ``failing``, else 200; counts requests."""

    failing = True
    requests = 0


class _Handler(BaseHTTPRequestHandler):
    server: Downstream

    def do_POST(self) -> None:
        self.server.requests += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(500 if self.server.failing else 200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def downstream() -> Iterator[Downstream]:
    server = Downstream(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def post(url: str, body: bytes) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, body, method="POST"), timeout=5):
        pass  # urlopen raises HTTPError on the 500s


async def test_breaker_opens_holds_events_and_closes_after_recovery(
    nc: NatsClient, names: dict[str, str], tmp_path: Path, downstream: Downstream
) -> None:
    await create_stream(nc, names, PARTITIONS)
    entities = {f"e{n}": 3 for n in range(8)}
    await publish(nc, names, in_order(entities), partitions=PARTITIONS)
    url = f"http://127.0.0.1:{downstream.server_address[1]}/apply"
    breaker = CircuitBreaker(timeout=1.0, failure_threshold=3, open_seconds=0.5, ack_wait=3.0)
    applies: list[tuple[str, str, int]] = []

    async def handler(event: EntityEvent, tx: sqlite3.Connection) -> None:
        await breaker.call(lambda: asyncio.to_thread(post, url, event.payload))
        applies.append((event.key.entity_type, event.key.entity_id, event.sequence))

    consumer, _ = make_consumer(
        nc,
        names,
        tmp_path,
        handler,
        ack_wait=3.0,
        max_deliveries=2,
        backoff=(0.05,),
    )
    consumer.breaker = breaker
    config = consumer.config
    async with running(consumer):
        # Many open periods pass: without the breaker each would spend deliveries.
        await wait_for(lambda: breaker.opened_count >= 5, 30, "the breaker to open 5 times")
        assert breaker.state is not BreakerState.CLOSED
        # At most: the failures that opened it, a call in flight per partition, one
        # trial per open period. A consumer that kept pulling would make many more.
        assert downstream.requests <= 3 + PARTITIONS + breaker.opened_count
        assert applies == []
        downstream.failing = False
        total = sum(entities.values())
        await wait_for(lambda: len(applies) == total, 30, "every event applied after recovery")
    assert breaker.state.value == "closed"
    assert await list_dead(nc, config.dlq_stream_name, config.dlq_subject_prefix) == []
    report = check_applies(applies)
    assert (report.gaps, report.duplicates, report.inversions) == (0, 0, 0)
