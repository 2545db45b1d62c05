"""Which partitions this replica processes: static by index, or KV leases.

With leases, each partition is a key in a JetStream KV bucket whose max age is the
lease TTL. A replica creates the key only if absent, renews it with a revision check
every ``ttl / 3`` and stops fetching from it once ``ttl * safety`` passed without a
renewal, which is before the key can expire and be taken by someone else. Replicas
also heartbeat a member key, so each knows how many replicas are live and holds at
most ``ceil(partitions / members)``, releasing the surplus for newcomers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from order_sidecar_client.consumer.config import LeaseConfig
from order_sidecar_client.consumer.errors import ConsumerConfigError

log = logging.getLogger(__name__)

_UNREACHABLE = (nats.errors.Error, asyncio.TimeoutError)


@dataclass(frozen=True)
class Plan:
    """What the replica should run now: ``keep`` partitions; stop and release ``surplus``."""

    keep: frozenset[int]
    surplus: frozenset[int] = frozenset()


class Assignment(Protocol):
    """A source of partitions for one replica."""

    interval: float

    async def refresh(self, partitions: int) -> Plan:
        """Renew, acquire and decide; called every ``interval`` seconds."""
        ...

    def valid(self, partition: int) -> bool:
        """Whether this replica may still fetch from *partition* right now."""
        ...

    def remaining(self, partition: int) -> float:
        """Seconds this replica may go on fetching from *partition*."""
        ...

    async def release(self, partition: int) -> None:
        """Give *partition* up (its worker has stopped)."""
        ...

    async def close(self) -> None:
        """Give everything up."""
        ...


class StaticAssignment:
    """Replica *index* of *replicas* takes partitions ``p`` with ``p % replicas == index``.

    The simple mode: no coordination, so running two replicas with the same index is
    the operator's mistake (the position store's check still keeps applies in order).
    """

    interval = 5.0

    def __init__(self, replicas: int, index: int) -> None:
        if replicas < 1 or not 0 <= index < replicas:
            raise ConsumerConfigError(f"replica index {index} is not in 0..{replicas - 1}")
        self.replicas = replicas
        self.index = index

    async def refresh(self, partitions: int) -> Plan:
        """The fixed share of this index."""
        mine = (p for p in range(partitions) if p % self.replicas == self.index)
        return Plan(frozenset(mine))

    def valid(self, partition: int) -> bool:
        """Always: nobody else takes these partitions."""
        return True

    def remaining(self, partition: int) -> float:
        """No deadline."""
        return math.inf

    async def release(self, partition: int) -> None:
        """Nothing to release."""

    async def close(self) -> None:
        """Nothing to close."""


@dataclass
class _Held:
    revision: int
    renewed_at: float  # monotonic time the last successful renewal was *sent*


class KvLeaseAssignment:
    """Partition leases and member heartbeats in one KV bucket."""

    def __init__(self, kv: KeyValue, nc: NatsClient, config: LeaseConfig) -> None:
        self._kv = kv
        self._nc = nc
        self.config = config
        self.interval = config.ttl / 3
        self._held: dict[int, _Held] = {}

    @classmethod
    async def open(cls, nc: NatsClient, config: LeaseConfig) -> KvLeaseAssignment:
        """Bind to the bucket, creating it (max age = lease TTL) if missing."""
        js = nc.jetstream()
        try:
            kv = await js.key_value(config.bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=config.bucket,
                    history=1,
                    ttl=config.ttl,
                    storage=StorageType.FILE,
                    description="partition leases of order-sidecar consumers",
                )
            )
        return cls(kv, nc, config)

    async def refresh(self, partitions: int) -> Plan:
        """Heartbeat, renew held leases, take free ones up to the fair share."""
        try:
            members = await self._heartbeat()
        except _UNREACHABLE as error:
            log.warning("lease bucket unreachable (%s); keeping leases until they lapse", error)
            return Plan(frozenset(p for p in self._held if self.valid(p)))
        await self._renew_all()
        share = math.ceil(partitions / max(members, 1))
        surplus = sorted(self._held)[share:]
        if len(self._held) < share:
            await self._acquire(partitions, share)
        keep = frozenset(p for p in self._held if p not in surplus and self.valid(p))
        return Plan(keep, frozenset(surplus))

    def valid(self, partition: int) -> bool:
        """Held and renewed recently enough to be sure nobody else holds it."""
        return self.remaining(partition) > 0

    def remaining(self, partition: int) -> float:
        """Seconds left before this replica must stop fetching from *partition*."""
        held = self._held.get(partition)
        if held is None:
            return 0.0
        deadline = held.renewed_at + self.config.ttl * self.config.safety
        return max(0.0, deadline - time.monotonic())

    async def release(self, partition: int) -> None:
        """Delete the key at the revision we hold, so a peer can take it at once."""
        held = self._held.pop(partition, None)
        if held is None:
            return
        try:
            await self._kv.delete(_partition_key(partition), last=held.revision)
        except (nats.js.errors.APIError, *_UNREACHABLE):
            pass  # already someone else's, or it will lapse by its TTL

    async def close(self) -> None:
        """Release every partition and the member key."""
        for partition in list(self._held):
            await self.release(partition)
        # A purge without a marker: peers stop counting this replica at once.
        subject = f"$KV.{self.config.bucket}.{self._member_key}"
        try:
            await self._nc.jsm().purge_stream(f"KV_{self.config.bucket}", subject=subject)
        except (nats.js.errors.APIError, *_UNREACHABLE):
            pass

    @property
    def _member_key(self) -> str:
        return f"members.{self.config.replica_id}"

    async def _heartbeat(self) -> int:
        await self._kv.put(self._member_key, b"1")
        info = await self._nc.jetstream().stream_info(
            f"KV_{self.config.bucket}", subjects_filter=f"$KV.{self.config.bucket}.members.>"
        )
        return len(info.state.subjects or {}) or 1

    async def _renew_all(self) -> None:
        for partition, held in list(self._held.items()):
            sent = time.monotonic()
            try:
                held.revision = await self._kv.update(
                    _partition_key(partition), self._owner, last=held.revision
                )
                held.renewed_at = sent
            except nats.js.errors.KeyWrongLastSequenceError:
                log.warning("lost the lease of partition %d", partition)
                del self._held[partition]
            except _UNREACHABLE as error:
                log.warning("cannot renew partition %d: %s", partition, error)

    async def _acquire(self, partitions: int, share: int) -> None:
        # Start at a replica-specific offset so replicas do not all race for partition 0.
        offset = zlib.crc32(self.config.replica_id.encode()) % partitions
        for step in range(partitions):
            if len(self._held) >= share:
                return
            partition = (offset + step) % partitions
            if partition in self._held:
                continue
            sent = time.monotonic()
            try:
                revision = await self._kv.create(_partition_key(partition), self._owner)
            except (nats.js.errors.KeyWrongLastSequenceError, *_UNREACHABLE):
                continue  # held by a peer: losing the race is a result
            self._held[partition] = _Held(revision, sent)
            log.info("took the lease of partition %d", partition)

    @property
    def _owner(self) -> bytes:
        return self.config.replica_id.encode()


def _partition_key(partition: int) -> str:
    return f"partitions.{partition}"
