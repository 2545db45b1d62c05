"""JetStream KV lock backend: a lock is a KV key, its revision the fencing token.

Acquire creates the key only if absent (or deleted); renew and release update or delete
it only at the revision we hold; a lock that is not renewed ends by the key's own TTL
(per-message TTL, nats-server 2.11+). On older servers the bucket's max age is the TTL of
every lock (``--lock-ttl`` when the sidecar creates the bucket). Needs nothing but NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from order_sidecar_client import contract

from order_sidecar.core.errors import ConfigError, LockBackendUnavailable
from order_sidecar.core.ports import Lease
from order_sidecar.locks.signals import LockSignals, Wakeup, WantedHandler

log = logging.getLogger(__name__)

MIN_SERVER = (2, 11)
EXPECTED_LAST = contract.HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE
MARKER_TTL = 60.0  # seconds a release's purge marker stays, so the bucket does not grow
_FIRST_RETRY_DELAY = 0.005
# Waiters are woken by a "freed" notice; the poll covers expiries and missed notices.
_MAX_RETRY_DELAY = 0.1
# Failures that leave the lock's state unknown (no responders while the bucket elects a
# leader, timeouts, a lost connection). Wrong-revision errors are caught before these.
_UNREACHABLE = (nats.errors.Error, asyncio.TimeoutError)


class NatsKvLockBackend:
    """Locks as keys of one KV bucket (``--lock-bucket``)."""

    name = "nats-kv"

    def __init__(
        self,
        nc: NatsClient,
        kv: KeyValue,
        js: JetStreamContext,
        bucket: str,
        fixed_ttl: float | None = None,
    ) -> None:
        self._nc = nc
        self._kv = kv
        self._js = js
        self._subject_prefix = f"$KV.{bucket}."
        #: Set on servers without per-key TTLs: every lock lives this long unless renewed.
        self.fixed_ttl = fixed_ttl
        self._notice_subject = f"ordersidecar.lock-notices.{bucket}"
        self._signals = LockSignals(self._send_notice)
        self._subscription: Subscription | None = None

    def on_wanted(self, handler: WantedHandler) -> None:
        """Have *handler(key)* called when another sidecar starts waiting for *key*."""
        self._signals.on_wanted(handler)

    async def _send_notice(self, notice: bytes) -> None:
        await self._nc.publish(self._notice_subject, notice)

    async def _listen_for_notices(self) -> None:
        async def received(msg: Msg) -> None:
            self._signals.received(msg.data)

        self._subscription = await self._nc.subscribe(self._notice_subject, cb=received)

    @classmethod
    async def open(
        cls,
        nc: NatsClient,
        bucket: str,
        replicas: int = 1,
        request_timeout: float = 2.0,
        lock_ttl: float = 10.0,
    ) -> NatsKvLockBackend:
        """Bind to *bucket*, creating it if missing.

        On a server without per-key TTLs the bucket is made with max age *lock_ttl*, and an
        existing bucket's max age is used as every lock's TTL.
        """
        server = nc.connected_server_version
        per_key_ttl = (server.major, server.minor) >= MIN_SERVER
        js = nc.jetstream(timeout=request_timeout)
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    storage=StorageType.FILE,
                    replicas=replicas,
                    ttl=None if per_key_ttl else lock_ttl,
                    description="entity locks of nats-order-sidecar",
                )
            )
        if per_key_ttl:
            return await cls._listening(nc, kv, js, bucket, None)
        max_age = (await js.stream_info(f"KV_{bucket}")).config.max_age
        if not max_age:
            raise ConfigError(
                f"KV bucket {bucket} has no max age and nats-server {server} has no per-key "
                "TTLs, so locks would never expire: delete the bucket, use another "
                "--lock-bucket, upgrade to nats-server 2.11+, or use --lock-backend redis"
            )
        log.info("nats-server %s: every lock lives %ss (bucket max age)", server, max_age)
        return await cls._listening(nc, kv, js, bucket, float(max_age))

    @classmethod
    async def _listening(
        cls,
        nc: NatsClient,
        kv: KeyValue,
        js: JetStreamContext,
        bucket: str,
        fixed_ttl: float | None,
    ) -> NatsKvLockBackend:
        backend = cls(nc, kv, js, bucket, fixed_ttl)
        await backend._listen_for_notices()
        return backend

    async def acquire(self, key: str, ttl: float, wait: float) -> Lease | None:
        """Create the key if absent; retry until *wait* ends, woken when the holder
        announces the lock free (or by a short jittered backoff)."""
        deadline = time.monotonic() + wait
        async with self._signals.contending(key, wait) as my_turn:
            if not my_turn:
                return None
            with self._signals.waiting(key) as wakeup:
                return await self._acquire(key, ttl, deadline, wakeup)

    async def _acquire(self, key: str, ttl: float, deadline: float, wakeup: Wakeup) -> Lease | None:
        delay = _FIRST_RETRY_DELAY
        token = secrets.token_hex(16)
        ttl = self.fixed_ttl or ttl
        while True:
            started = time.monotonic()
            try:
                revision = await self._kv.create(
                    _kv_key(key), token.encode(), msg_ttl=self._msg_ttl(ttl)
                )
                return Lease(key=key, ttl=ttl, handle=(revision, token), started=started)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.NotFoundError):
                pass  # held by someone else, or it expired while we looked: try again
            except _UNREACHABLE as error:
                raise LockBackendUnavailable(
                    f"NATS KV lock backend unreachable ({type(error).__name__}); retry later"
                ) from error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Asked again after each miss: with no queue, the holder may have won again.
            await self._signals.announce_wanted(key)
            await wakeup.wait(min(remaining, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, _MAX_RETRY_DELAY)

    async def renew(self, lease: Lease) -> bool:
        """Rewrite the key at the revision we hold, restarting its TTL."""
        revision, token = _handle_of(lease)
        try:
            ack = await self._js.publish(
                self._subject_prefix + _kv_key(lease.key),
                token.encode(),
                headers={EXPECTED_LAST: str(revision)},
                msg_ttl=self._msg_ttl(lease.ttl),
            )
        except nats.js.errors.APIError:
            return False  # the key moved on (or is gone): not ours any more
        except _UNREACHABLE as error:
            raise LockBackendUnavailable(
                f"cannot renew {lease.key}: NATS KV unreachable ({type(error).__name__})"
            ) from error
        lease.handle = (int(ack.seq), token)
        return True

    async def release(self, lease: Lease) -> None:
        """Purge the key if it is still at our revision; the purge marker expires too."""
        revision, _ = _handle_of(lease)
        try:
            await self._js.publish(
                self._subject_prefix + _kv_key(lease.key),
                b"",
                headers={
                    EXPECTED_LAST: str(revision),
                    "KV-Operation": "PURGE",
                    "Nats-Rollup": "sub",
                },
                msg_ttl=self._msg_ttl(MARKER_TTL),
            )
        except (nats.js.errors.APIError, *_UNREACHABLE):
            return
        await self._signals.announce_freed(lease.key)

    def _msg_ttl(self, ttl: float) -> float | None:
        # The server takes whole seconds; rounding up keeps the lock at least as long as
        # its holder counts on (a shorter lock could let two holders overlap).
        return None if self.fixed_ttl else float(max(1, math.ceil(ttl)))

    async def healthy(self) -> bool:
        """Whether the bucket answers."""
        try:
            await self._kv.status()
        except (nats.js.errors.APIError, *_UNREACHABLE):
            return False
        return True

    async def close(self) -> None:
        """Stop listening for notices (the sidecar owns the NATS connection)."""
        if self._subscription is not None:
            with contextlib.suppress(*_UNREACHABLE):
                await self._subscription.unsubscribe()


def _kv_key(key: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; lock keys are stream:type:token with token safe.
    return key.replace(":", ".")


def _handle_of(lease: Lease) -> tuple[int, str]:
    handle = lease.handle
    if not (isinstance(handle, tuple) and len(handle) == 2):
        raise TypeError(f"lease {lease.key} was not issued by the NATS KV backend")
    return int(handle[0]), str(handle[1])
