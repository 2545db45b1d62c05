"""Ordered, partitioned, apply-once consumption of a sidecar stream.

>>> store = SqlitePositionStore("replica.db")
>>> consumer = OrderedConsumer(nc, ConsumerConfig("ENTITY_EVENTS"), store, handler,
...                            await KvLeaseAssignment.open(nc, LeaseConfig("LEASES", "pod-1")))
>>> await consumer.run()

See docs/consumers.md for the model and its guarantees.
"""

from .apply import ConsumerMetrics, Handler, Outcome
from .assignment import Assignment, KvLeaseAssignment, Plan, StaticAssignment
from .breaker import BreakerState, CircuitBreaker
from .config import BlockedPolicy, ConsumerConfig, GapPolicy, LeaseConfig
from .consumer import OrderedConsumer
from .dlq import DeadEntry, list_dead, request_replay
from .errors import BreakerOpen, CallTimeout, ConsumerConfigError, ConsumerError, GapError
from .event import EntityEvent, EntityKey
from .positions import Block, PositionStore, SqlitePositionStore

__all__ = [
    "Assignment",
    "Block",
    "BlockedPolicy",
    "BreakerOpen",
    "BreakerState",
    "CallTimeout",
    "CircuitBreaker",
    "ConsumerConfig",
    "ConsumerConfigError",
    "ConsumerError",
    "ConsumerMetrics",
    "DeadEntry",
    "EntityEvent",
    "EntityKey",
    "GapError",
    "GapPolicy",
    "Handler",
    "KvLeaseAssignment",
    "LeaseConfig",
    "OrderedConsumer",
    "Outcome",
    "Plan",
    "PositionStore",
    "SqlitePositionStore",
    "StaticAssignment",
    "list_dead",
    "request_replay",
]
