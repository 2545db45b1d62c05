"""The LockBackend Protocol every lock backend implements.

Locks are the fast path that keeps sidecars from contending for an entity; order does
not rest on them (the broker's fencing check does). So the contract is small:
losing a race is a result (``None``), a backend that cannot answer raises
``LockBackendUnavailable``, and a lease may be lost at any time without notice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class Lease:
    """A held lock on one key.

    ``handle`` is the backend's own state for the lease; callers never look inside.
    """

    key: str
    ttl: float
    handle: object
    #: time.monotonic() when the successful attempt began: the lock's TTL runs from no
    #: earlier than this, so a holder that counts from here never outlives its lock.
    started: float = 0.0


@runtime_checkable
class LockBackend(Protocol):
    """A distributed lock service keyed by string."""

    name: str

    async def acquire(self, key: str, ttl: float, wait: float) -> Lease | None:
        """Take *key* for *ttl* seconds, waiting up to *wait* seconds for its holder.

        Returns ``None`` when someone else held it for the whole wait. Raises
        ``LockBackendUnavailable`` when the backend cannot decide.
        """
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend *lease* by its ttl. ``False``: it is no longer ours.

        Raises ``LockBackendUnavailable`` when the backend cannot tell (the lease may
        still hold; try again before its TTL runs out).
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give *lease* up. Never raises for a lease that already expired."""
        ...

    def on_wanted(self, handler: Callable[[str], None]) -> None:
        """Have *handler(key)* called when another sidecar starts waiting for *key*.

        Best effort: a holder that hears it hands the lock over instead of keeping it
        for its own next request; one that does not gives it up when it idles.
        """
        ...

    async def healthy(self) -> bool:
        """Whether the backend answers now (for health checks and metrics)."""
        ...

    async def close(self) -> None:
        """Close connections."""
        ...
