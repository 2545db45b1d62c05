"""Stream order equals the producers' commit order when they hold leases (and not without).

Producer processes loop read-modify-write on shared rows of a real store (Redis hashes
with a row version) and publish the new version. With a lease across the transaction,
every row's versions in the stream strictly increase and end at the store's final
version. The same workload without leases races, and the same check fails.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys

from nats.aio.client import Client as NatsClient
from order_sidecar_client import AsyncSidecarClient, Event
from redis.asyncio import Redis

from tests.support.helpers import stream_messages
from tests.support.load import WORKLOAD, Producers, sidecar_options

from .conftest import World

PRODUCERS = 4
ROWS = 5
TRANSACTIONS_EACH = 60


async def version_order_violations(
    nc: NatsClient, stream: str, redis_url: str, prefix: str
) -> dict[str, int]:
    """Per row: versions in stream order that do not strictly increase, and rows whose
    last published version is not the store's final one."""
    versions: dict[str, list[int]] = {}
    for message in await stream_messages(nc, stream):
        versions.setdefault(message.headers["Entity-Id"], []).append(
            int(message.headers["X-Row-Version"])
        )
    redis = Redis.from_url(redis_url)
    try:
        final = {
            row: int(await redis.hget(f"row:{prefix}:{row}", "version") or 0) for row in versions
        }
    finally:
        await redis.aclose()
    not_increasing = sum(
        1 for seq in versions.values() for a, b in itertools.pairwise(seq) if b <= a
    )
    stale_end = sum(1 for row, seq in versions.items() if seq[-1] != final[row])
    return {"not_increasing": not_increasing, "stale_end": stale_end}


async def run_commit_workload(lease: bool, world: World) -> dict[str, int]:
    options = sidecar_options(world.nats_server, world.redis_server, world.names)
    running = [world.sidecars(f"sidecar-{n}", **options) for n in range(2)]
    producers = Producers(world.tmp_path)
    for n in range(PRODUCERS):
        producers.start(
            "commit",
            f"committer-{n}",
            target=running[n % 2].target,
            redis_url=world.redis_server.url,
            subject_prefix=world.names["subject_prefix"],
            entities=ROWS,
            events=TRANSACTIONS_EACH,
            tasks=3,
            lease="yes" if lease else "no",
        )
    assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
    assert len(producers.replies()) == PRODUCERS * TRANSACTIONS_EACH
    return await version_order_violations(
        world.nc, world.stream, world.redis_server.url, world.names["subject_prefix"]
    )


async def test_with_leases_stream_follows_commit_order(world: World) -> None:
    violations = await run_commit_workload(True, world)
    assert violations == {"not_increasing": 0, "stale_end": 0}


async def test_without_leases_the_same_check_fails(world: World) -> None:
    violations = await run_commit_workload(False, world)
    assert violations["not_increasing"] > 0


async def test_lease_expires_while_its_holder_is_stopped(world: World) -> None:
    nats_server, redis_server, names = world.nats_server, world.redis_server, world.names
    nc, tmp_path = world.nc, world.tmp_path
    sidecar = world.sidecars("sidecar", **sidecar_options(nats_server, redis_server, names))
    holder = subprocess.Popen(
        [
            sys.executable,
            str(WORKLOAD),
            "lease-holder",
            f"--target={sidecar.target}",
            "--producer=holder",
            f"--out={tmp_path / 'holder.jsonl'}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    loop = asyncio.get_running_loop()
    try:
        assert (await loop.run_in_executor(None, holder.stdout.readline)).startswith("acquired")
        os.kill(holder.pid, signal.SIGSTOP)  # its renewals stop; the 1 s lease runs out
        async with (
            AsyncSidecarClient(sidecar.target) as other,
            other.lease("patient", "held", ttl=5.0, wait=10.0) as lease,
        ):
            for _ in range(2):
                await lease.publish(Event("patient", "held", "update"))
        os.kill(holder.pid, signal.SIGCONT)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        answer = await loop.run_in_executor(None, holder.stdout.readline)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
    assert answer.startswith("refused FAILED_PRECONDITION"), answer
    stored = await stream_messages(nc, names["stream"])
    assert [m.headers["Entity-Sequence"] for m in stored] == ["1", "2"]
