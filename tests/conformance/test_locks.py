"""One conformance suite for every LockBackend, on real servers.

Each backend fixture yields a factory of independent clients (as separate sidecars
would have) plus the servers behind them, so tests can stop servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from order_sidecar.core.errors import LockBackendUnavailable
from order_sidecar.locks import LockBackend
from order_sidecar.locks.nats_kv import NatsKvLockBackend
from order_sidecar.locks.redis import RedisLockBackend
from redis.asyncio import Redis

from tests.support.servers import ManagedProcess, NatsServer, RedisServer

TTL = 1.0


@dataclass
class BackendUnderTest:
    """A way to make clients of one backend, and the servers it needs."""

    name: str
    servers: list[ManagedProcess]
    make: Callable[[], Awaitable[LockBackend]]
    #: How many wait in an entity's queue; None for a backend without a fair queue.
    waiting: Callable[[str], Awaitable[int]] | None
    #: Arguments for lock_holder.py: backend kind and server URLs.
    holder_args: list[str] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _redis(tmp_path: Path, masters: int) -> BackendUnderTest:
    servers = [RedisServer(tmp_path, f"redis-{n}") for n in range(masters)]
    for server in servers:
        server.start()
    urls = [server.url for server in servers]

    async def waiting(key: str) -> int:
        redis = Redis.from_url(urls[0])
        try:
            return int(await redis.zcard(f"ordersidecar:queue:{key}"))
        finally:
            await redis.aclose()

    async def make() -> LockBackend:
        return RedisLockBackend(urls, io_timeout=0.5)

    return BackendUnderTest(f"redis x{masters}", list(servers), make, waiting, ["redis", *urls])


def _nats_kv(tmp_path: Path, binary: str = "") -> BackendUnderTest:
    server = NatsServer(tmp_path, binary=binary)
    server.start()
    under_test = BackendUnderTest(
        "nats-kv", [server], lambda: _never(), None, ["nats-kv", server.url]
    )

    async def make() -> LockBackend:
        # Finite reconnects: a reconnect loop against a server that teardown killed does
        # not stop when cancelled, and would hang the event loop's shutdown.
        nc = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=50)

        async def close() -> None:
            nc.options["max_reconnect_attempts"] = 1
            await nc.close()

        under_test.closers.append(close)
        backend = await NatsKvLockBackend.open(nc, "CONFORMANCE", request_timeout=0.5, lock_ttl=TTL)
        assert (backend.fixed_ttl is not None) == bool(binary)
        return backend

    under_test.make = make
    return under_test


async def _never() -> LockBackend:
    raise AssertionError("replaced before use")


def _old_nats_server() -> str:
    """Debian's nats-server (2.9 here), which has no per-key TTLs, if it is installed."""
    binary = shutil.which("nats-server", path="/usr/sbin:/usr/bin") or ""
    if not binary:
        return ""
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"v(\d+)\.(\d+)", version)
    return binary if match and (int(match[1]), int(match[2])) < (2, 11) else ""


@pytest.fixture(params=["redis-single", "redis-quorum-3", "nats-kv", "nats-kv-max-age"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BackendUnderTest]:
    if request.param == "nats-kv-max-age":
        old = _old_nats_server()
        if not old:
            pytest.skip("no nats-server older than 2.11 installed (Debian's package has 2.9)")
        under_test = _nats_kv(tmp_path, old)
    elif request.param == "nats-kv":
        under_test = _nats_kv(tmp_path)
    else:
        under_test = _redis(tmp_path, 1 if request.param == "redis-single" else 3)
    yield under_test
    for close in under_test.closers:
        # nats-py's close can hang while it reconnects after a server restart.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(close(), 5.0)
    for server in under_test.servers:
        server.kill()


@pytest.fixture
async def clients(backend: BackendUnderTest) -> AsyncIterator[list[LockBackend]]:
    made = [await backend.make() for _ in range(3)]
    yield made
    for client in made:
        await client.close()


async def test_only_one_of_many_acquirers_wins(clients: list[LockBackend]) -> None:
    # Without waiting, a quorum may split its votes so that nobody wins: at most one.
    tries = await asyncio.gather(*(c.acquire("k-race", 10.0, 0.0) for c in clients * 4))
    assert sum(1 for lease in tries if lease is not None) <= 1
    # Allowed to wait (shorter than the TTL), exactly one gets it and the rest time out.
    waits = await asyncio.gather(*(c.acquire("k-race-wait", 10.0, 0.5) for c in clients * 4))
    assert sum(1 for lease in waits if lease is not None) == 1


async def test_losing_a_race_is_none_after_the_wait(clients: list[LockBackend]) -> None:
    first, second = clients[0], clients[1]
    assert await first.acquire("k-wait", 10.0, 0.0) is not None
    started = asyncio.get_running_loop().time()
    assert await second.acquire("k-wait", 10.0, 0.3) is None
    assert asyncio.get_running_loop().time() - started >= 0.3


async def test_a_waiter_gets_the_lock_when_it_is_released(clients: list[LockBackend]) -> None:
    lease = await clients[0].acquire("k-handover", 10.0, 0.0)
    assert lease is not None
    waiter = asyncio.ensure_future(clients[1].acquire("k-handover", 10.0, 5.0))
    await asyncio.sleep(0.1)  # a window in which the waiter must not get a held lock
    assert not waiter.done()
    await clients[0].release(lease)
    assert await waiter is not None


async def test_an_unrenewed_lock_expires(clients: list[LockBackend]) -> None:
    assert await clients[0].acquire("k-expire", TTL, 0.0) is not None
    assert await clients[1].acquire("k-expire", TTL, TTL * 3) is not None


async def test_renewal_keeps_the_lock_past_its_ttl(clients: list[LockBackend]) -> None:
    lease = await clients[0].acquire("k-renew", TTL, 0.0)
    assert lease is not None
    for _ in range(4):
        await asyncio.sleep(TTL / 3)
        assert await clients[0].renew(lease)
    assert await clients[1].acquire("k-renew", TTL, 0.0) is None


async def test_an_expired_lease_cannot_be_renewed(clients: list[LockBackend]) -> None:
    lease = await clients[0].acquire("k-late", TTL, 0.0)
    assert lease is not None
    assert await clients[1].acquire("k-late", TTL, TTL * 3) is not None
    assert not await clients[0].renew(lease)


async def test_release_by_a_non_owner_does_not_free_the_lock(clients: list[LockBackend]) -> None:
    stale = await clients[0].acquire("k-owner", TTL, 0.0)
    assert stale is not None
    current = await clients[1].acquire("k-owner", 10.0, TTL * 3)
    assert current is not None
    await clients[0].release(stale)  # must not raise, must not free the new owner's lock
    assert await clients[2].acquire("k-owner", 10.0, 0.0) is None


async def test_server_loss(backend: BackendUnderTest, clients: list[LockBackend]) -> None:
    """A quorum survives a minority down and refuses without a majority; one master is all."""
    majority = len(backend.servers) // 2 + 1
    for server in backend.servers[: majority - 1]:
        server.kill()
    if majority > 1:
        assert await clients[0].acquire("k-minority-down", TTL, 0.0) is not None
    backend.servers[majority - 1].kill()
    with pytest.raises(LockBackendUnavailable):
        await clients[1].acquire("k-majority-down", TTL, 0.0)
    for server in backend.servers:
        server.start()
    assert await _acquire_when_back(clients[2], "k-back") is not None


async def _acquire_when_back(client: LockBackend, key: str) -> object:
    deadline = asyncio.get_running_loop().time() + 20.0
    while True:
        try:
            return await client.acquire(key, TTL, 1.0)
        except LockBackendUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_waiters_are_served_first_come_first_served(
    backend: BackendUnderTest, clients: list[LockBackend]
) -> None:
    """No waiter starves: newcomers queue behind whoever waits already."""
    if backend.waiting is None:
        pytest.skip(f"{backend.name} has no fair wait queue (see docs/leases.md)")
    holder = await clients[0].acquire("k-fair", 10.0, 0.0)
    assert holder is not None
    order: list[str] = []

    async def wait_turn(name: str, client: LockBackend) -> None:
        lease = await client.acquire("k-fair", 10.0, 20.0)
        assert lease is not None
        order.append(name)
        await client.release(lease)

    waiters = []
    for n in range(4):
        waiters.append(asyncio.ensure_future(wait_turn(f"w{n}", clients[1 + n % 2])))
        await _until(functools.partial(_at_least, backend, "k-fair", n + 1), 10.0)
    await clients[0].release(holder)
    await asyncio.gather(*waiters)
    assert order == ["w0", "w1", "w2", "w3"]


async def _at_least(backend: BackendUnderTest, key: str, count: int) -> bool:
    assert backend.waiting is not None
    return await backend.waiting(key) >= count


async def _until(condition: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_renewal_without_a_majority_is_unknown_not_lost(
    backend: BackendUnderTest, clients: list[LockBackend]
) -> None:
    """A backend that cannot answer says so; 'not renewed' means the lock is gone."""
    lease = await clients[0].acquire("k-unknown", 10.0, 0.0)
    assert lease is not None
    majority = len(backend.servers) // 2 + 1
    for server in backend.servers[:majority]:
        server.kill()
    with pytest.raises(LockBackendUnavailable):
        await clients[0].renew(lease)


async def test_owner_crash_frees_the_lock_after_its_ttl(
    backend: BackendUnderTest, clients: list[LockBackend]
) -> None:
    """The owner process is SIGKILLed while holding the lock: it never releases or renews,
    and the lock is free again once its TTL has passed."""
    kind, *urls = backend.holder_args
    holder = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "support" / "lock_holder.py"),
            kind,
            "k-crash",
            str(TTL),
            *urls,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, holder.stdout.readline)
        assert line.strip() == "held"
        assert await clients[0].acquire("k-crash", TTL, 0.0) is None
        holder.kill()
        holder.wait()
        started = asyncio.get_running_loop().time()
        assert await clients[0].acquire("k-crash", TTL, TTL * 4) is not None
        assert asyncio.get_running_loop().time() - started <= TTL * 4
    finally:
        holder.kill()
        holder.wait()
