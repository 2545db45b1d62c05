"""Prometheus metrics: one registry per sidecar, served on ``--metrics-listen``.

Names follow Prometheus conventions under one prefix, ``ordersidecar_``. No label carries
an entity id (unbounded cardinality); entity types are not labels either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import start_http_server as _serve

from order_sidecar import __version__
from order_sidecar.core.errors import (
    Contention,
    EarlierEventFailed,
    IdempotencyKeyReused,
    InvalidEvent,
    LeaseLost,
    PreconditionFailed,
    SidecarError,
    Unavailable,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric of one sidecar."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.lock_acquire_seconds = Histogram(
            "ordersidecar_lock_acquire_seconds",
            "Time to take an entity lock.",
            ["backend", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.lock_contended = Counter(
            "ordersidecar_lock_contended_total",
            "Lock acquires that found the entity locked by someone else.",
            ["backend"],
            registry=registry,
        )
        self.locks_held = Gauge(
            "ordersidecar_locks_held",
            "Entity locks this sidecar holds now.",
            ["backend"],
            registry=registry,
        )
        self.lock_renewals = Counter(
            "ordersidecar_lock_renewals_total",
            "Lock renewals by outcome (ok, lost, unknown).",
            ["backend", "outcome"],
            registry=registry,
        )
        self.locks_lost = Counter(
            "ordersidecar_locks_lost_total",
            "Locks found lost while held.",
            ["backend"],
            registry=registry,
        )
        self.fencing_rejections = Counter(
            "ordersidecar_fencing_rejections_total",
            "Publishes JetStream refused because the entity moved on (stale fencing token).",
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "ordersidecar_rpc_seconds",
            "Time to answer an RPC, by RPC and outcome.",
            ["rpc", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.publish_results = Counter(
            "ordersidecar_publish_results_total",
            "Published events by outcome (ok, duplicate, conflict, stale, invalid, "
            "unavailable, error).",
            ["outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "ordersidecar_requests_in_flight", "RPCs being served now.", registry=registry
        )
        self.entities_busy = Gauge(
            "ordersidecar_entities_busy",
            "Entities with a publish in flight or queued.",
            registry=registry,
        )
        self.entity_queue_waiting = Gauge(
            "ordersidecar_entity_queue_waiting",
            "Publishes waiting behind another of the same entity (all entities together).",
            registry=registry,
        )
        self.backend_up = Gauge(
            "ordersidecar_backend_up",
            "1 while a backend answers, else 0.",
            ["backend"],
            registry=registry,
        )
        self.nats_reconnects = Counter(
            "ordersidecar_nats_reconnects_total", "Reconnections to NATS.", registry=registry
        )
        self.lock_backend_reconnects = Counter(
            "ordersidecar_lock_backend_reconnects_total",
            "Times the lock backend (Redis or NATS KV) answered again after being unreachable.",
            ["backend"],
            registry=registry,
        )
        self.lock_backend_errors = Counter(
            "ordersidecar_lock_backend_errors_total",
            "Lock backend calls that could not reach it (Redis or NATS KV).",
            ["backend"],
            registry=registry,
        )
        Info("ordersidecar_build", "Version of the sidecar.", registry=registry).info(
            {"version": __version__}
        )

    def serve(self, listen: str) -> tuple[Any, int]:
        """Serve /metrics on *listen* (host:port, port 0 for any); the server and its port."""
        host, _, port = listen.rpartition(":")
        server, _ = _serve(int(port), host, registry=self.registry)
        return server, int(server.server_port)

    def watch_queues(self, busy: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Read queue gauges from the gates when scraped."""
        self.entities_busy.set_function(busy)
        self.entity_queue_waiting.set_function(waiting)

    def count_result(self, result: object) -> str:
        """Count one event's outcome; return its label."""
        outcome = outcome_of(result)
        self.publish_results.labels(outcome).inc()
        return outcome


def outcome_of(result: object) -> str:
    """The outcome label of a publish result (a Stored or an error)."""
    if isinstance(result, SidecarError):
        if isinstance(result, InvalidEvent):
            return "invalid"
        if isinstance(result, PreconditionFailed):
            return "stale"
        if isinstance(result, Contention | EarlierEventFailed | LeaseLost | IdempotencyKeyReused):
            return "conflict"
        if isinstance(result, Unavailable):
            return "unavailable"
        return "error"
    if isinstance(result, BaseException):
        return "error"
    return "duplicate" if getattr(result, "duplicate", False) else "ok"
