"""The consumer package's one error hierarchy.

Losing a partition lease is not an error: assignment returns fewer partitions. These
exceptions are for what a caller must see or act on.
"""

from __future__ import annotations


class ConsumerError(Exception):
    """Base class of every error the consumer raises."""


class ConsumerConfigError(ConsumerError):
    """The configuration is invalid or does not match the stream."""


class GapError(ConsumerError):
    """An entity's sequence jumped and the gap policy is ``fail``: stop loudly."""


class BreakerOpen(ConsumerError):
    """The circuit breaker refuses calls for now; the event is retried, not dead-lettered."""


class CallTimeout(ConsumerError):
    """A call made through the circuit breaker took longer than its timeout."""
