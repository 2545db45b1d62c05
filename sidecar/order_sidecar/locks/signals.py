"""Lock notices between sidecars: "someone waits for this lock" and "this lock is free".

Both are best-effort pushes over the backend's own pub/sub (Redis channels or core NATS
subjects). A waiter that misses a notice still finds the lock by its fallback poll, and a
holder that misses one gives the lock up when it idles; safety never rests on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

log = logging.getLogger(__name__)

WANTED = b"wanted"
FREED = b"freed"
_SEPARATOR = b"\x00"
#: Most keys remembered as wanted; a notice for a key we no longer hold is harmless.
_MAX_WANTED = 100_000

#: Told a key another sidecar waits for (it may or may not be held here).
WantedHandler = Callable[[str], None]


class Wakeup:
    """What one waiter waits on: set when its lock is announced free."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Wait for a free notice up to *seconds*; True when one came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        woken = self._event.is_set()
        self._event.clear()
        return woken

    def set(self) -> None:
        """Wake the waiter."""
        self._event.set()


class _Turn:
    """Local callers contending for one key, one at a time."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class LockSignals:
    """Local bookkeeping of lock notices; *send* puts one notice on the wire."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        # Per key, in arrival order (a dict as an ordered set).
        self._waiters: dict[str, dict[Wakeup, None]] = {}
        self._wanted: set[str] = set()
        self._on_wanted: WantedHandler = lambda _key: None
        self._turns: dict[str, _Turn] = {}

    def on_wanted(self, handler: WantedHandler) -> None:
        """Have *handler(key)* called when another sidecar starts waiting for *key*."""
        self._on_wanted = handler

    @contextlib.asynccontextmanager
    async def contending(self, key: str, within: float) -> AsyncIterator[bool]:
        """Take this process's turn to contend for *key*: first come, first served among
        local callers, so one free notice does not send them all at the backend at once.
        Yields False when the turn did not come within *within* seconds."""
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        try:
            if turn.lock.locked():
                try:
                    await asyncio.wait_for(turn.lock.acquire(), max(within, 0.0))
                except TimeoutError:
                    yield False
                    return
            else:
                await turn.lock.acquire()  # free: no wait (wait_for(0) would refuse it)
            try:
                yield True
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    @contextlib.contextmanager
    def waiting(self, key: str) -> Iterator[Wakeup]:
        """Register a waiter for *key* before trying it, so no free notice slips by."""
        wakeup = Wakeup()
        self._waiters.setdefault(key, {})[wakeup] = None
        try:
            yield wakeup
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.pop(wakeup, None)
                if not waiters:
                    del self._waiters[key]

    async def announce_wanted(self, key: str) -> None:
        """Tell every sidecar that this one waits for *key*."""
        await self._quietly(WANTED + _SEPARATOR + key.encode())

    async def announce_freed(self, key: str) -> None:
        """Tell waiters that *key* is free, when someone said it waits for it."""
        if key in self._wanted:
            self._wanted.discard(key)
            await self._quietly(FREED + _SEPARATOR + key.encode())

    def received(self, notice: bytes) -> None:
        """Handle one notice from the wire (ours included)."""
        kind, _, raw_key = notice.partition(_SEPARATOR)
        key = raw_key.decode(errors="replace")
        if kind == FREED:
            # Only the longest waiting one: it is the one at the head of the queue (or the
            # only one contending), and waking all would send them at the backend at once.
            for wakeup in self._waiters.get(key, ()):
                wakeup.set()
                break
        elif kind == WANTED:
            # Remembered even when no gate holds it: a lease RPC may hold it.
            if len(self._wanted) >= _MAX_WANTED:
                self._wanted.clear()
            self._wanted.add(key)
            self._on_wanted(key)

    async def _quietly(self, notice: bytes) -> None:
        try:
            await self._send(notice)
        except Exception as error:  # best effort by design: waiters fall back to polling
            log.debug("lock notice not sent: %r", error)
