"""Frozen settings of the ordered consumer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from order_sidecar_client.consumer.errors import ConsumerConfigError

#: The largest ``batch_size``: every event of a batch is held (and heartbeated) unacked.
MAX_BATCH = 10_000


class GapPolicy(enum.Enum):
    """What to do when an entity's sequence jumps past ``applied + 1``."""

    #: Hold the event (NAK with delay) up to ``gap_wait``, then dead-letter it and block.
    DLQ = "dlq"
    #: Hold the event up to ``gap_wait``, then raise :class:`GapError` and stop the consumer.
    FAIL = "fail"


class BlockedPolicy(enum.Enum):
    """What happens to later events of an entity that is blocked (it has a DLQ'd event)."""

    #: Dead-letter them too: the partition moves on, ``dlq replay`` re-drives the entity.
    DLQ = "dlq"
    #: Hold them (NAK with delay): the whole partition waits until the entity is replayed.
    WAIT = "wait"


@dataclass(frozen=True)
class ConsumerConfig:
    """How an :class:`OrderedConsumer` reads one sidecar stream.

    ``subject_prefix`` and ``partitions`` are read from the stream's metadata when left
    empty / zero. ``ack_wait`` must exceed the handler's usual time: slow handlers are
    kept alive by in-progress heartbeats every ``ack_wait / 3``.

    ``batch_size`` is how many events a partition fetches at once (its consumer's
    ``max_ack_pending``) and applies in one transaction; 1 is one event per fetch and
    per transaction. A transaction takes no further event once it has been open
    ``batch_max_seconds`` (it commits and the rest of the batch goes into the next one),
    so a slow handler does not hold the store's write lock, or a lease, for long.
    """

    stream: str
    name: str = "ordered"
    subject_prefix: str = ""
    partitions: int = 0
    ack_wait: float = 10.0
    max_deliveries: int = 5
    backoff: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
    fetch_timeout: float = 1.0
    gap_policy: GapPolicy = GapPolicy.DLQ
    gap_wait: float = 5.0
    blocked_policy: BlockedPolicy = BlockedPolicy.DLQ
    dlq_stream: str = ""
    dlq_prefix: str = ""
    replay_check_interval: float = 0.5
    batch_size: int = 256
    batch_max_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.max_deliveries < 1:
            raise ConsumerConfigError("max_deliveries must be at least 1")
        if self.ack_wait <= 0 or self.fetch_timeout <= 0:
            raise ConsumerConfigError("ack_wait and fetch_timeout must be positive")
        if not self.backoff:
            raise ConsumerConfigError("backoff needs at least one delay")
        self._check_batch()

    def _check_batch(self) -> None:
        # bool is an int: reject it too, a flag passed where a count belongs.
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH:
            raise ConsumerConfigError(
                f"batch_size must be an integer from 1 to {MAX_BATCH}, got {size!r}"
            )
        if not self.batch_max_seconds > 0:
            raise ConsumerConfigError(
                f"batch_max_seconds must be positive, got {self.batch_max_seconds!r}"
            )

    @property
    def dlq_stream_name(self) -> str:
        """The dead-letter stream: ``{stream}_DLQ`` unless set."""
        return self.dlq_stream or f"{self.stream}_DLQ"

    @property
    def dlq_subject_prefix(self) -> str:
        """Subjects of the dead-letter stream: ``dlq.{stream}`` unless set."""
        return self.dlq_prefix or f"dlq.{self.stream}"

    def delay_after(self, deliveries: int) -> float:
        """The NAK delay after the *deliveries*-th failed delivery."""
        return self.backoff[min(max(deliveries, 1), len(self.backoff)) - 1]


@dataclass(frozen=True)
class LeaseConfig:
    """Partition leases in a JetStream KV bucket (``--assignment kv``).

    A lease lives ``ttl`` seconds after its last renewal; holders renew every ``ttl / 3``
    and stop fetching once ``ttl * safety`` has passed without a renewal, so a partition
    is released by its old holder before anyone else can take it.
    """

    bucket: str
    replica_id: str
    ttl: float = 6.0
    safety: float = 0.6

    def __post_init__(self) -> None:
        if self.ttl < 1 or not 0 < self.safety < 1:
            raise ConsumerConfigError("lease ttl must be >= 1 s and safety in (0, 1)")
