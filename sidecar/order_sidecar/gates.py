"""Per-entity gates: one local queue per entity, and the distributed lock it holds.

A sidecar never contends with itself: its own requests for an entity wait in the
gate's FIFO mutex, and only the gate talks to the lock backend. The lock is kept
while requests are queued (and renewed at ttl/3), and given up when the gate idles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import Contention, LockBackendUnavailable
from .locks.base import Lease, LockBackend
from .logs import entity_type_of
from .stream import EntityPosition

log = logging.getLogger(__name__)

BACKEND_RETRY_AFTER = 1.0


@dataclass
class EntityGate:
    """The local state of one busy entity."""

    key: str
    mutex: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    lease: Lease | None = None
    lease_lost: bool = False
    renewer: asyncio.Task[None] | None = None
    # Trusted only while the lease is held; the broker's fencing check catches the rest.
    position: EntityPosition | None = None


@dataclass
class LockPolicy:
    """How gates use the lock backend."""

    ttl: float
    wait: float
    reject_when_unavailable: bool


class EntityGates:
    """All gates of one sidecar."""

    def __init__(self, backend: LockBackend, policy: LockPolicy) -> None:
        self._backend = backend
        self._policy = policy
        self._gates: dict[str, EntityGate] = {}
        self._backend_down_until = 0.0

    @property
    def busy_entities(self) -> int:
        """Entities with a request in flight or queued."""
        return len(self._gates)

    @property
    def waiting(self) -> int:
        """Requests queued behind another of the same entity."""
        return sum(gate.users for gate in self._gates.values()) - len(self._gates)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[EntityGate]:
        """Hold *key*'s gate: requests of one entity pass one at a time, first come first."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = EntityGate(key)
        gate.users += 1
        try:
            async with gate.mutex:
                try:
                    yield gate
                finally:
                    if gate.users == 1:
                        await self._let_go(gate)
        finally:
            gate.users -= 1
            if gate.users == 0:
                if self._gates.get(key) is gate:
                    del self._gates[key]
                # A waiter cancelled after the holder handed over to it must not leave
                # the lock held (and renewed) by a gate nobody can reach any more.
                if gate.lease is not None or gate.renewer is not None:
                    await self._let_go(gate)

    async def ensure_lease(self, gate: EntityGate, budget: float | None) -> None:
        """Hold the entity's distributed lock, unless the backend is down and we may fence.

        Raises Contention when another sidecar holds it for the whole wait.
        """
        if gate.lease is not None and not gate.lease_lost:
            return
        await self._drop_lease(gate)
        gate.position = None
        if time.monotonic() < self._backend_down_until:
            self._on_backend_down(None)
            return
        wait = self._policy.wait if budget is None else max(0.0, min(self._policy.wait, budget))
        try:
            lease = await self._backend.acquire(gate.key, self._policy.ttl, wait)
        except LockBackendUnavailable as error:
            self._backend_down_until = time.monotonic() + BACKEND_RETRY_AFTER
            self._on_backend_down(error)
            return
        if lease is None:
            raise Contention(
                f"another producer held the entity's lock for {wait:.1f}s; retry with the "
                "same idempotency_key (or raise --lock-wait)"
            )
        gate.lease, gate.lease_lost = lease, False
        gate.renewer = asyncio.create_task(self._renew(gate, lease))

    def _on_backend_down(self, error: LockBackendUnavailable | None) -> None:
        if self._policy.reject_when_unavailable:
            raise error or LockBackendUnavailable(
                f"lock backend {self._backend.name} is unreachable; retry later"
            )
        if error is not None:
            log.warning(
                "lock backend %s unreachable (%s): publishing on without locks, order kept "
                "by the broker's fencing check",
                self._backend.name,
                error,
            )

    async def _renew(self, gate: EntityGate, lease: Lease) -> None:
        while True:
            await asyncio.sleep(lease.ttl / 3)
            try:
                renewed = await self._backend.renew(lease)
            except LockBackendUnavailable as error:
                # It may still hold; if not, the broker's fencing check keeps order.
                log.warning(
                    "could not renew a lock: %s",
                    error,
                    extra={"entity_type": entity_type_of(gate.key)},
                )
                continue
            if not renewed:
                gate.lease_lost = True
                log.info("a lock was lost; it will be re-taken and the entity re-read")
                return

    async def _let_go(self, gate: EntityGate) -> None:
        await self._drop_lease(gate)
        gate.position = None

    async def _drop_lease(self, gate: EntityGate) -> None:
        lease, renewer = gate.lease, gate.renewer
        gate.lease, gate.renewer, gate.lease_lost = None, None, False
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if lease is not None:
            await self._backend.release(lease)
