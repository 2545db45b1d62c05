"""Per-entity gates: one local queue per entity, and the distributed lock it holds.

A sidecar never contends with itself: its own requests for an entity wait in the
gate's FIFO mutex, and only the gate talks to the lock backend. The lock is kept
while requests are queued (and renewed at ttl/3) and for ``linger`` seconds after the
gate idles, so an entity written again soon pays no lock round trip. It is handed over
at once, after the request in progress, when another sidecar says it waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from order_sidecar_client.contract import entity_type_of_lock_key as entity_type_of

from order_sidecar.core.errors import Contention, LockBackendUnavailable
from order_sidecar.core.hints import PositionHints
from order_sidecar.core.model import EntityPosition, Event, Stored
from order_sidecar.core.ports import Lease, LockBackend
from order_sidecar.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)

BACKEND_RETRY_AFTER = 1.0
CLOSE_TIMEOUT = 5.0


@dataclass(eq=False, slots=True)
class Waiter:
    """One request's event, queued at its entity's gate.

    Whoever holds the gate may take it into a chain and publish it with its own; the
    request then finds its answer when its turn at the gate comes.
    """

    event: Event
    #: Never taken into a chain, and no chain reaches past it (it keeps its place).
    alone: bool = False
    result: Stored | None = None
    error: BaseException | None = None
    #: Taken into a chain by the holder (undone if the holder stops before answering).
    taken: bool = False

    @property
    def answered(self) -> bool:
        """Whether a result or an error is in."""
        return self.result is not None or self.error is not None

    def outcome(self) -> Stored:
        """The result, or raise the error."""
        if self.error is not None:
            raise self.error
        assert self.result is not None, "a waiter asked for its outcome before it had one"
        return self.result


@dataclass(slots=True)
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
    #: The position is a guess from before this lease (a stale one is refused, not wrong).
    guessed: bool = False
    #: Another sidecar waits for the lock: give it up after the request in progress.
    wanted: bool = False
    linger: asyncio.TimerHandle | None = None
    #: Requests waiting for the gate that the holder may publish with its own (FIFO).
    queued: deque[Waiter] = field(default_factory=deque)


@dataclass
class LockPolicy:
    """How gates use the lock backend."""

    ttl: float
    wait: float
    reject_when_unavailable: bool
    #: Seconds an idle gate keeps its lock (0: give it up at once).
    linger: float = 0.0
    #: Positions remembered after gates are let go (0: none).
    hints: int = 0
    #: Seconds a lock is kept, while busy, after another sidecar asks for it.
    hand_over_after: float = 0.01


class EntityGates:
    """All gates of one sidecar."""

    def __init__(self, backend: LockBackend, policy: LockPolicy) -> None:
        self._backend = backend
        self._policy = policy
        self._gates: dict[str, EntityGate] = {}
        self._hints = PositionHints(policy.hints)
        self._backend_down_until = 0.0
        self._letting_go: set[asyncio.Task[None]] = set()
        backend.on_wanted(self._hand_over)

    @property
    def busy_entities(self) -> int:
        """Entities with a request in flight or queued."""
        return sum(1 for gate in self._gates.values() if gate.users)

    @property
    def lingering(self) -> int:
        """Idle entities whose lock is kept for a while."""
        return sum(1 for gate in self._gates.values() if not gate.users)

    @property
    def hinted(self) -> int:
        """Entities whose last position is remembered."""
        return len(self._hints)

    @property
    def waiting(self) -> int:
        """Requests queued behind another of the same entity."""
        return sum(max(0, gate.users - 1) for gate in self._gates.values())

    @contextlib.asynccontextmanager
    async def hold(self, key: str, waiter: Waiter | None = None) -> AsyncIterator[EntityGate]:
        """Hold *key*'s gate: requests of one entity pass one at a time, first come first.

        *waiter*: queued at the gate while this request waits its turn, so that the
        holder may publish it along with its own event (it leaves the queue on exit).
        """
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = self._new_gate(key)
        if waiter is not None:
            gate.queued.append(waiter)
        gate.users += 1
        if gate.linger is not None:
            gate.linger.cancel()
            gate.linger = None
        try:
            async with gate.mutex:
                try:
                    yield gate
                finally:
                    if self._should_hand_over(gate):
                        await self._let_go(gate, keep_position=gate.users > 1)
                    elif gate.users == 1 and not self._may_linger(gate):
                        await self._let_go(gate)
        finally:
            if waiter is not None:
                gate.queued.remove(waiter)
            gate.users -= 1
            if gate.users == 0:
                await self._idle(gate)

    async def close(self, within: float = CLOSE_TIMEOUT) -> None:
        """Give up every lingering lock (at shutdown, once requests are done).

        Bounded by *within* seconds: with the backend down, releases would each wait for
        their timeout, and an unreleased lock ends by its TTL anyway.
        """
        for gate in list(self._gates.values()):
            if not gate.users:
                self._let_go_later(gate)
        if not self._letting_go:
            return
        _, pending = await asyncio.wait(set(self._letting_go), timeout=within)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d locks not released at shutdown: they expire by their TTL", len(pending))

    def _new_gate(self, key: str) -> EntityGate:
        hint = self._hints.take(key)
        return EntityGate(key, position=hint, guessed=hint is not None)

    def _should_hand_over(self, gate: EntityGate) -> bool:
        # Held a little while first, so a hot entity moves between sidecars in runs of
        # events rather than paying a lock round trip per event.
        lease = gate.lease
        return (
            gate.wanted
            and lease is not None
            and time.monotonic() - lease.started >= self._policy.hand_over_after
        )

    def _may_linger(self, gate: EntityGate) -> bool:
        return self._policy.linger > 0 and gate.lease is not None and not gate.lease_lost

    async def _idle(self, gate: EntityGate) -> None:
        if self._may_linger(gate) and not gate.wanted and self._gates.get(gate.key) is gate:
            gate.linger = asyncio.get_running_loop().call_later(
                self._policy.linger, self._let_go_later, gate
            )
            return
        self._forget(gate)
        # Also covers a waiter cancelled after the holder handed over to it: the lock
        # must not stay held (and renewed) by a gate nobody can reach any more.
        await self._let_go(gate)

    def _forget(self, gate: EntityGate) -> None:
        if gate.linger is not None:
            gate.linger.cancel()
            gate.linger = None
        if self._gates.get(gate.key) is gate:
            del self._gates[gate.key]

    def _hand_over(self, key: str) -> None:
        """Another sidecar waits for *key*: give it up now if idle, else after this request."""
        gate = self._gates.get(key)
        if gate is None or gate.lease is None:
            return  # not held here (our own notice, or one from before we got it)
        gate.wanted = True
        if not gate.users:
            self._let_go_later(gate)

    def _let_go_later(self, gate: EntityGate) -> None:
        if gate.users:
            return
        self._forget(gate)
        task = asyncio.create_task(self._let_go(gate))
        self._letting_go.add(task)
        task.add_done_callback(self._letting_go.discard)

    async def ensure_lease(self, gate: EntityGate, budget: float | None) -> None:
        """Hold the entity's distributed lock, unless the backend is down and we may fence.

        Raises Contention when another sidecar holds it for the whole wait.
        """
        if gate.lease is not None and not gate.lease_lost:
            return
        if gate.lease_lost:
            gate.position = None
        await self._drop_lease(gate)
        # Someone may have written the entity since: what we knew is a guess now.
        gate.guessed = gate.position is not None
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
        # Also ends when the gate lets this lease go: a cancel can be swallowed (tasks.py).
        while gate.lease is lease:
            await asyncio.sleep(lease.ttl / 3)
            if gate.lease is not lease:
                return
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

    async def _let_go(self, gate: EntityGate, *, keep_position: bool = False) -> None:
        """Give the lock up; the position stays on the gate (for its queued requests) or
        goes to the hints, first, so a new gate for the entity finds it."""
        gate.wanted = False
        if not keep_position:
            if gate.position is not None:
                self._hints.remember(gate.key, gate.position)
            gate.position = None
        await self._drop_lease(gate)

    async def _drop_lease(self, gate: EntityGate) -> None:
        lease, renewer = gate.lease, gate.renewer
        gate.lease, gate.renewer, gate.lease_lost = None, None, False
        await cancel_and_wait(renewer)
        if lease is not None:
            await self._backend.release(lease)
