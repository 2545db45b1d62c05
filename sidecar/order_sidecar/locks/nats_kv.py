"""JetStream KV lock backend: a lock is a KV key, its revision the fencing token.

Acquire creates the key only if absent (or deleted); renew and release update or delete
it only at the revision we hold; a lock that is not renewed ends by the key's own TTL
(per-message TTL, nats-server 2.11+). Needs no service besides NATS.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from ..errors import ConfigError, LockBackendUnavailable
from .base import Lease

MIN_SERVER = (2, 11)
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
MARKER_TTL = 60.0  # seconds a release's purge marker stays, so the bucket does not grow
_FIRST_RETRY_DELAY = 0.005
_MAX_RETRY_DELAY = 0.05
# Failures that leave the lock's state unknown (no responders while the bucket elects a
# leader, timeouts, a lost connection). Wrong-revision errors are caught before these.
_UNREACHABLE = (nats.errors.Error, asyncio.TimeoutError)


class NatsKvLockBackend:
    """Locks as keys of one KV bucket (``--lock-bucket``)."""

    name = "nats-kv"

    def __init__(self, kv: KeyValue, js: JetStreamContext, bucket: str) -> None:
        self._kv = kv
        self._js = js
        self._subject_prefix = f"$KV.{bucket}."

    @classmethod
    async def open(
        cls, nc: NatsClient, bucket: str, replicas: int = 1, request_timeout: float = 2.0
    ) -> NatsKvLockBackend:
        """Bind to *bucket*, creating it if missing; ConfigError on a server without key TTLs."""
        server = nc.connected_server_version
        version = (server.major, server.minor)
        if version < MIN_SERVER:
            raise ConfigError(
                f"--lock-backend nats-kv needs nats-server {MIN_SERVER[0]}.{MIN_SERVER[1]}+ "
                f"for per-key TTLs; this server is {server}: upgrade it "
                "or use --lock-backend redis"
            )
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
                    description="entity locks of nats-order-sidecar",
                )
            )
        return cls(kv, js, bucket)

    async def acquire(self, key: str, ttl: float, wait: float) -> Lease | None:
        """Create the key if absent; retry with a short jittered backoff until *wait* ends."""
        deadline = time.monotonic() + wait
        delay = _FIRST_RETRY_DELAY
        token = secrets.token_hex(16)
        while True:
            try:
                revision = await self._kv.create(_kv_key(key), token.encode(), msg_ttl=ttl)
                return Lease(key=key, ttl=ttl, handle=(revision, token))
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            except _UNREACHABLE as error:
                raise LockBackendUnavailable(
                    f"NATS KV lock backend unreachable ({type(error).__name__}); retry later"
                ) from error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, _MAX_RETRY_DELAY)

    async def renew(self, lease: Lease) -> bool:
        """Rewrite the key at the revision we hold, restarting its TTL."""
        revision, token = _handle_of(lease)
        try:
            ack = await self._js.publish(
                self._subject_prefix + _kv_key(lease.key),
                token.encode(),
                headers={EXPECTED_LAST: str(revision)},
                msg_ttl=lease.ttl,
            )
        except (nats.js.errors.APIError, *_UNREACHABLE):
            return False
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
                msg_ttl=MARKER_TTL,
            )
        except (nats.js.errors.APIError, *_UNREACHABLE):
            pass

    async def close(self) -> None:
        """Nothing to close: the sidecar owns the NATS connection."""


def _kv_key(key: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; lock keys are stream:type:token with token safe.
    return key.replace(":", ".")


def _handle_of(lease: Lease) -> tuple[int, str]:
    handle = lease.handle
    if not (isinstance(handle, tuple) and len(handle) == 2):
        raise TypeError(f"lease {lease.key} was not issued by the NATS KV backend")
    return int(handle[0]), str(handle[1])
