"""Ordered, partitioned, apply-once consumption of a sidecar stream.

>>> store = SqlitePositionStore("replica.db")
>>> consumer = OrderedConsumer(nc, ConsumerConfig("ENTITY_EVENTS"), store, handler,
...                            await KvLeaseAssignment.open(nc, LeaseConfig("LEASES", "pod-1")))
>>> await consumer.run()

See docs/consumers.md for the model and its guarantees.
"""

from order_sidecar_client.consumer.apply import ConsumerMetrics, Handler, Outcome
from order_sidecar_client.consumer.assignment import (
    Assignment,
    KvLeaseAssignment,
    Plan,
    StaticAssignment,
)
from order_sidecar_client.consumer.breaker import BreakerState, CircuitBreaker
from order_sidecar_client.consumer.config import (
    BlockedPolicy,
    ConsumerConfig,
    GapPolicy,
    LeaseConfig,
)
from order_sidecar_client.consumer.consumer import OrderedConsumer
from order_sidecar_client.consumer.dlq import DeadEntry, list_dead, request_replay
from order_sidecar_client.consumer.errors import (
    BreakerOpen,
    CallTimeout,
    ConsumerConfigError,
    ConsumerError,
    GapError,
)
from order_sidecar_client.consumer.event import EntityEvent, EntityKey
from order_sidecar_client.consumer.positions import Block, PositionStore, SqlitePositionStore

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
