"""Redis lock backend: pottery's AIORedlock over one master or a quorum of masters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

from pottery import AIORedlock
from pottery.exceptions import ExtendUnlockedLock, QuorumIsImpossible, ReleaseUnlockedLock
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from order_sidecar.core.errors import LockBackendUnavailable
from order_sidecar.core.ports import Lease
from order_sidecar.core.tasks import cancel_and_wait
from order_sidecar.locks.fairqueue import FairQueue
from order_sidecar.locks.signals import LockSignals, WantedHandler

log = logging.getLogger(__name__)
# pottery logs a full traceback for every unreachable master; our own line says enough.
logging.getLogger("pottery").setLevel(logging.CRITICAL)

_FIRST_RETRY_DELAY = 0.005
# Waiters are woken by a "freed" notice; the poll only covers locks that expire or are
# released by a sidecar that missed the "wanted" notice.
_MAX_RETRY_DELAY = 0.1
NOTICE_CHANNEL = "ordersidecar:lock-notices"
_RESUBSCRIBE_AFTER = 1.0


class RedisLockBackend:
    """Locks as Redlock keys ``redlock:ordersidecar:{key}`` on every master.

    With several masters a lock needs a majority, so it survives a minority down.
    Waiters queue first come, first served on the first master (see ``fairqueue``).
    """

    name = "redis"

    def __init__(
        self,
        urls: list[str],
        *,
        io_timeout: float = 1.0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """*options*: more ``Redis.from_url`` arguments (credentials, TLS) for every master."""
        self._masters = [
            Redis.from_url(
                url,
                socket_connect_timeout=io_timeout,
                socket_timeout=io_timeout,
                retry=Retry(NoBackoff(), 0),
                **(options or {}),
            )
            for url in urls
        ]
        self._queue = FairQueue(self._masters[0])
        # Pub/sub holds its connection open between messages: no socket timeout there.
        self._notices = Redis.from_url(
            urls[0],
            socket_connect_timeout=io_timeout,
            retry=Retry(NoBackoff(), 0),
            **(options or {}),
        )
        self._signals = LockSignals(self._send_notice)
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    def on_wanted(self, handler: WantedHandler) -> None:
        """Have *handler(key)* called when another sidecar starts waiting for *key*."""
        self._signals.on_wanted(handler)

    async def acquire(self, key: str, ttl: float, wait: float) -> Lease | None:
        """Try at once; if taken, queue up (first come, first served) until *wait* runs
        out, woken when the holder announces the lock free."""
        self._listen_for_notices()
        # Unlike nats-kv, no local turn-taking: every waiter holds its own place in the
        # shared queue (first come, first served per request), and only the head tries.
        deadline = time.monotonic() + wait
        delay = _FIRST_RETRY_DELAY
        waiter = uuid.uuid4().hex
        queued = False
        with self._signals.waiting(key) as wakeup:
            try:
                while True:
                    if await self._may_try(key, waiter, join=queued):
                        lease = await self._try_once(key, ttl)
                        if lease is not None:
                            return lease
                    if not queued:
                        # Join the queue before asking the holder to hand over, so the
                        # holder's own next request queues behind us.
                        queued = True
                        await self._may_try(key, waiter, join=True)
                    # Asked after every miss: a notice sent while the holder was still
                    # acquiring is ignored by it.
                    await self._signals.announce_wanted(key)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    await wakeup.wait(min(remaining, delay * random.uniform(0.5, 1.5)))
                    delay = min(delay * 2, _MAX_RETRY_DELAY)
            finally:
                if queued:
                    await self._leave_queue(key, waiter)

    async def _may_try(self, key: str, waiter: str, *, join: bool) -> bool:
        try:
            return await self._queue.my_turn(key, waiter, join=join)
        except (RedisError, OSError):
            return True  # fairness is best effort; safety does not rest on the queue

    async def _leave_queue(self, key: str, waiter: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._queue.leave(key, waiter)

    async def _try_once(self, key: str, ttl: float) -> Lease | None:
        started = time.monotonic()
        lock = AIORedlock(
            key=f"ordersidecar:{key}",
            masters=self._masters,
            auto_release_time=ttl,
            num_extensions=sys.maxsize,
            raise_on_redis_errors=True,
        )
        try:
            acquired = await lock.acquire(blocking=False)
        except (QuorumIsImpossible, RedisError, OSError) as error:
            raise LockBackendUnavailable(
                f"Redis lock backend unreachable ({type(error).__name__}); "
                "check --redis-url and that a majority of masters is up"
            ) from error
        return Lease(key=key, ttl=ttl, handle=lock, started=started) if acquired else None

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease on a majority of masters."""
        lock = _lock_of(lease)
        try:
            await lock.extend(raise_on_redis_errors=True)
        except ExtendUnlockedLock:
            return False
        except (QuorumIsImpossible, RedisError, OSError) as error:
            raise LockBackendUnavailable(
                f"cannot renew {lease.key}: Redis unreachable ({type(error).__name__})"
            ) from error
        return True

    async def release(self, lease: Lease) -> None:
        """Delete the lease where it is still ours; an expired one is fine."""
        lock = _lock_of(lease)
        try:
            await lock.release(raise_on_redis_errors=False)
        except ReleaseUnlockedLock:
            pass
        except (QuorumIsImpossible, RedisError, OSError) as error:
            log.warning("lock release failed (it will expire): %s", type(error).__name__)
            return
        await self._signals.announce_freed(lease.key)

    async def healthy(self) -> bool:
        """Whether a majority of masters answers PING."""
        answers = await asyncio.gather(
            *(master.ping() for master in self._masters), return_exceptions=True
        )
        return sum(1 for answer in answers if answer is True) > len(self._masters) // 2

    async def close(self) -> None:
        """Stop listening for notices; close every master's connection pool."""
        self._closing = True
        await cancel_and_wait(self._listener)
        await self._notices.aclose()
        for master in self._masters:
            await master.aclose()

    async def _send_notice(self, notice: bytes) -> None:
        await self._masters[0].publish(NOTICE_CHANNEL, notice)

    def _listen_for_notices(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while not self._closing:
            pubsub = self._notices.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(NOTICE_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._signals.received(message["data"])
            except (RedisError, OSError) as error:
                log.debug("lock notices interrupted (%s); resubscribing", type(error).__name__)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(_RESUBSCRIBE_AFTER)


def _lock_of(lease: Lease) -> AIORedlock:
    lock = lease.handle
    if not isinstance(lock, AIORedlock):
        raise TypeError(f"lease {lease.key} was not issued by the Redis backend")
    return lock
