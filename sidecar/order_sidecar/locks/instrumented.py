"""A lock backend wrapped with Prometheus metrics and log lines: the same Protocol, measured."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from order_sidecar_client.contract import entity_type_of_lock_key as entity_type_of

from order_sidecar.core.errors import LockBackendUnavailable
from order_sidecar.core.ports import Lease, LockBackend
from order_sidecar.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class InstrumentedLocks:
    """A LockBackend that measures the backend it wraps."""

    def __init__(self, backend: LockBackend, metrics: Metrics) -> None:
        self._backend = backend
        self._metrics = metrics
        self.name = backend.name

    async def acquire(self, key: str, ttl: float, wait: float) -> Lease | None:
        """Acquire, timed by outcome."""
        started = time.perf_counter()
        try:
            lease = await self._backend.acquire(key, ttl, wait)
        except LockBackendUnavailable:
            self._observe(started, "unavailable")
            self._metrics.lock_backend_errors.labels(self.name).inc()
            self._log(logging.WARNING, "lock backend unreachable", key, "unavailable", started)
            raise
        waited = time.perf_counter() - started
        if lease is None or waited > 0.05:
            self._metrics.lock_contended.labels(self.name).inc()
        self._observe(started, "acquired" if lease else "timeout")
        if lease is None:
            self._log(logging.INFO, "lock wait timed out", key, "timeout", started)
        if lease is not None:
            self._metrics.locks_held.labels(self.name).inc()
        return lease

    async def renew(self, lease: Lease) -> bool:
        """Renew, counted by outcome."""
        try:
            renewed = await self._backend.renew(lease)
        except LockBackendUnavailable:
            self._metrics.lock_renewals.labels(self.name, "unknown").inc()
            self._metrics.lock_backend_errors.labels(self.name).inc()
            raise
        self._metrics.lock_renewals.labels(self.name, "ok" if renewed else "lost").inc()
        if not renewed:
            self._metrics.locks_lost.labels(self.name).inc()
            self._log(logging.WARNING, "lock lost while held", lease.key, "lost", None)
        return renewed

    async def release(self, lease: Lease) -> None:
        """Release; the lock no longer counts as held."""
        self._metrics.locks_held.labels(self.name).dec()
        await self._backend.release(lease)

    def on_wanted(self, handler: Callable[[str], None]) -> None:
        """Pass the handler to the wrapped backend."""
        self._backend.on_wanted(handler)

    async def close(self) -> None:
        """Close the wrapped backend."""
        await self._backend.close()

    async def healthy(self) -> bool:
        """Whether the wrapped backend answers."""
        return await self._backend.healthy()

    def _log(self, level: int, message: str, key: str, reason: str, started: float | None) -> None:
        fields = {"backend": self.name, "entity_type": entity_type_of(key), "reason": reason}
        if started is not None:
            fields["duration_ms"] = str(round((time.perf_counter() - started) * 1000, 2))
        log.log(level, message, extra=fields)

    def _observe(self, started: float, outcome: str) -> None:
        self._metrics.lock_acquire_seconds.labels(self.name, outcome).observe(
            time.perf_counter() - started
        )
