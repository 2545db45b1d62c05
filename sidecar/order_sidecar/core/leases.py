"""Caller-held leases: an entity's lock held for a caller across its own transaction.

A lease is the same lock the sidecar takes for a plain publish, held until the caller
releases it or stops renewing it: its Redis key and this registry share one TTL, and
RenewLease extends both. Publishes under a lease skip the lock round trip and continue
from the lease's own view of the entity; if the broker says the entity moved on, the
lease is lost and the publish refused, never re-read and retried, because the caller's
transaction was based on the old state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from order_sidecar_client import contract

from order_sidecar.core.errors import Contention, LeaseLost, LeaseNotFound
from order_sidecar.core.model import EntityPosition
from order_sidecar.core.ports import EventLog, Lease, LockBackend
from order_sidecar.core.validation import shown

log = logging.getLogger(__name__)


@dataclass
class CallerLease:
    """One lease held for a caller."""

    lease_id: str
    entity_type: str
    entity_id: str
    subject: str
    lock: Lease
    ttl: float
    expires_at: float  # time.monotonic(): keeps counting while the process is stopped
    position: EntityPosition
    fencing_token: int
    lost: str = ""
    mutex: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def expires_at_wall(self) -> float:
        """The expiry on the wall clock, for callers."""
        return time.time() + (self.expires_at - time.monotonic())

    def check_alive(self) -> None:
        """Raise LeaseLost unless the lease still holds."""
        if self.lost:
            raise LeaseLost(f"lease {self.lease_id} was lost: {self.lost}; {_REDO}")
        if time.monotonic() >= self.expires_at:
            raise LeaseLost(f"lease {self.lease_id} expired (TTL {self.ttl:g}s); {_REDO}")


_REDO = "acquire a new lease and redo the transaction"


class LeaseRegistry:
    """The leases this sidecar holds for its callers."""

    def __init__(self, backend: LockBackend, stream: EventLog, stream_name: str) -> None:
        self._backend = backend
        self._stream = stream
        self._stream_name = stream_name
        self._leases: dict[str, CallerLease] = {}

    def lock_key(self, entity_type: str, entity_id: str) -> str:
        """The lock name of an entity (shared with plain publishes)."""
        return contract.lock_key(self._stream_name, entity_type, entity_id)

    async def acquire(
        self, entity_type: str, entity_id: str, subject: str, ttl: float, wait: float
    ) -> CallerLease:
        """Take the entity's lock for a caller, waiting up to *wait* seconds."""
        await self.forget_expired()
        lock = await self._backend.acquire(self.lock_key(entity_type, entity_id), ttl, wait)
        if lock is None:
            raise Contention(
                f"entity {entity_type}/{entity_id} stayed locked for {wait:g}s; retry later"
            )
        taken_at = lock.started or time.monotonic()
        ttl = lock.ttl  # the backend's effective TTL (a KV bucket may fix it)
        try:
            position = await self._stream.position(subject, from_leader=True)
        except BaseException:
            await self._backend.release(lock)
            raise
        lease = CallerLease(
            lease_id=secrets.token_hex(16),
            entity_type=entity_type,
            entity_id=entity_id,
            subject=subject,
            lock=lock,
            ttl=ttl,
            expires_at=taken_at + ttl,
            position=position,
            fencing_token=position.sequence,
        )
        self._leases[lease.lease_id] = lease
        return lease

    @property
    def count(self) -> int:
        """Leases held now (expired ones are dropped lazily)."""
        return len(self._leases)

    def get(self, lease_id: str) -> CallerLease:
        """The live lease *lease_id*; LeaseLost if it is unknown, expired or lost."""
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseLost(
                f"lease {shown(lease_id)} is unknown to this sidecar (expired, released, or issued "
                f"by another sidecar); {_REDO}"
            )
        lease.check_alive()
        return lease

    async def renew(self, lease_id: str) -> CallerLease:
        """Extend a live lease by its TTL."""
        lease = self.get(lease_id)
        renewed_at = time.monotonic()
        # LockBackendUnavailable passes through as UNAVAILABLE: the lease may still hold,
        # and the caller's renewer tries again.
        if not await self._backend.renew(lease.lock):
            lease.lost = "its lock could not be renewed (expired or taken over)"
            raise LeaseLost(f"lease {lease_id} was lost: {lease.lost}; {_REDO}")
        lease.expires_at = renewed_at + lease.ttl
        return lease

    async def release(self, lease_id: str) -> None:
        """Give a lease up; LeaseNotFound when there is nothing to release."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            raise LeaseNotFound(f"lease {shown(lease_id)} is not held here (expired or released)")
        await self._backend.release(lease.lock)

    async def release_all(self) -> None:
        """Give every lease up (shutdown)."""
        for lease_id in list(self._leases):
            await self.release(lease_id)

    async def forget_expired(self) -> None:
        """Drop and release leases whose TTL passed (callers that vanished)."""
        # Releasing an expired lock is a no-op for the backend (it checks ownership), but
        # it keeps the held-locks count honest for callers that vanished.
        now = time.monotonic()
        for lease_id in [k for k, v in self._leases.items() if v.expires_at <= now]:
            await self._backend.release(self._leases.pop(lease_id).lock)
