"""A circuit breaker for a handler's side effects (REST calls).

Each call gets a timeout shorter than the consumer's ack wait, so a hung endpoint fails
the call before the broker redelivers. After ``failure_threshold`` consecutive
failures the breaker opens for ``open_seconds``: calls fail fast with
:class:`BreakerOpen`, and the consumer stops fetching and holds its current event
(in-progress heartbeats) instead of burning redeliveries. After that time one trial
call is let through (half-open); success closes the breaker, failure opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from order_sidecar_client.consumer.errors import BreakerOpen, CallTimeout, ConsumerConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    """Closed: calls pass. Open: calls refused. Half-open: one trial call."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Counts consecutive failures of calls made through :meth:`call`."""

    def __init__(
        self,
        timeout: float,
        failure_threshold: int = 5,
        open_seconds: float = 5.0,
        ack_wait: float | None = None,
    ) -> None:
        if ack_wait is not None and timeout >= ack_wait:
            raise ConsumerConfigError(
                f"breaker timeout {timeout}s must be shorter than the ack wait {ack_wait}s"
            )
        self.timeout = timeout
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_count = 0
        self._opened_at = 0.0
        self._trial_running = False
        self._changed = asyncio.Event()

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run *operation* with the timeout; :class:`BreakerOpen` while open."""
        self._admit()
        try:
            result = await asyncio.wait_for(operation(), self.timeout)
        except TimeoutError as error:
            self._record_failure()
            raise CallTimeout(f"call took longer than {self.timeout}s") from error
        except BaseException:
            self._record_failure()
            raise
        self._record_success()
        return result

    def allows(self) -> bool:
        """Whether a call would be let through now."""
        if self.state is BreakerState.OPEN and self._open_remaining() <= 0:
            self.state = BreakerState.HALF_OPEN
        return self.state is BreakerState.CLOSED or (
            self.state is BreakerState.HALF_OPEN and not self._trial_running
        )

    async def wait_until_allowed(self) -> None:
        """Return once a call would be let through (the consumer's gate before fetching)."""
        while not self.allows():
            self._changed.clear()
            wait = self._open_remaining() if self.state is BreakerState.OPEN else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(wait, 0.01))

    def _admit(self) -> None:
        if not self.allows():
            raise BreakerOpen(f"circuit open for another {self._open_remaining():.1f}s")
        if self.state is BreakerState.HALF_OPEN:
            self._trial_running = True

    def _open_remaining(self) -> float:
        return self._opened_at + self.open_seconds - time.monotonic()

    def _record_failure(self) -> None:
        self._trial_running = False
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            if self.state is not BreakerState.OPEN:
                self.opened_count += 1
                log.warning("circuit breaker open after %d failures", self.failures)
            self.state = BreakerState.OPEN
            self._opened_at = time.monotonic()
        self._changed.set()

    def _record_success(self) -> None:
        self._trial_running = False
        if self.state is not BreakerState.CLOSED:
            log.info("circuit breaker closed")
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._changed.set()
