"""A process that takes one lock and then hangs until it is killed (owner-crash test)."""

from __future__ import annotations

import asyncio
import sys

import nats
from order_sidecar.core.ports import LockBackend
from order_sidecar.locks.nats_kv import NatsKvLockBackend
from order_sidecar.locks.redis import RedisLockBackend


async def main(kind: str, key: str, ttl: float, urls: list[str]) -> None:
    backend: LockBackend
    if kind == "redis":
        backend = RedisLockBackend(urls)
    else:
        nc = await nats.connect(urls[0])
        backend = await NatsKvLockBackend.open(nc, "CONFORMANCE", lock_ttl=ttl)
    lease = await backend.acquire(key, ttl, 5.0)
    print("held" if lease else "not held", flush=True)
    await asyncio.Event().wait()  # never releases, never renews


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]))
