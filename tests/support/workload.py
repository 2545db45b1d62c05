"""A producer replica for end-to-end tests, run as its own process.

``sidecar`` mode publishes through a sidecar with the Python client and writes one
JSON line per event: its key and where it landed (or the final error).
``naive`` mode is the baseline the seed describes: each event takes its number from a
shared counter (the producer's commit order, a Redis INCR) and is published straight
to JetStream, so replicas race and consumers see inversions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from typing import Any, TextIO

import nats
from order_sidecar_client import AsyncSidecarClient, Event, RetryPolicy, SidecarError, contract
from redis.asyncio import Redis

PATIENCE = RetryPolicy(attempts=60, first_backoff=0.05, max_backoff=1.0, attempt_timeout=5.0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sidecar", "naive", "commit", "lease-holder"])
    parser.add_argument("--lease", choices=["yes", "no"], default="no")
    parser.add_argument("--api", choices=["unary", "stream"], default="unary")
    parser.add_argument("--target", default="")
    parser.add_argument("--nats-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--subject-prefix", default="")
    parser.add_argument("--producer", required=True)
    parser.add_argument("--entities", type=int, default=20)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--entity-type", default="patient")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def pick_entity(args: argparse.Namespace) -> str:
    return f"e{random.randrange(args.entities)}"


async def run_sidecar(args: argparse.Namespace, out: TextIO) -> int:
    if args.api == "stream":
        return await run_sidecar_stream(args, out)
    failures = 0
    async with AsyncSidecarClient(args.target, retry=PATIENCE) as client:

        async def task(count: int) -> None:
            nonlocal failures
            for _ in range(count):
                event = Event(args.entity_type, pick_entity(args), "update", args.producer.encode())
                record: dict[str, Any] = {"key": event.idempotency_key, "entity": event.entity_id}
                try:
                    published = await client.publish(event)
                    record |= {
                        "sequence": published.sequence,
                        "stream_sequence": published.stream_sequence,
                        "duplicate": published.duplicate,
                    }
                except SidecarError as error:
                    failures += 1
                    record["error"] = error.code.name
                out.write(json.dumps(record) + "\n")

        await asyncio.gather(*(task(n) for n in split(args.events, args.tasks)))
    return 1 if failures else 0


async def run_sidecar_stream(args: argparse.Namespace, out: TextIO) -> int:
    """All of this producer's events over one PublishStream, as fast as it takes them."""
    events = [
        Event(args.entity_type, pick_entity(args), "update", args.producer.encode())
        for _ in range(args.events)
    ]
    failures = 0
    async with AsyncSidecarClient(args.target, retry=PATIENCE) as client:
        async for event, result in client.publish_stream(events):
            record: dict[str, Any] = {"key": event.idempotency_key, "entity": event.entity_id}
            if isinstance(result, SidecarError):
                failures += 1
                record["error"] = result.code.name
            else:
                record |= {
                    "sequence": result.sequence,
                    "stream_sequence": result.stream_sequence,
                    "duplicate": result.duplicate,
                }
            out.write(json.dumps(record) + "\n")
    return 1 if failures else 0


async def run_naive(args: argparse.Namespace, out: TextIO) -> int:
    nc = await nats.connect(args.nats_url)
    js = nc.jetstream()
    redis = Redis.from_url(args.redis_url)

    async def task(count: int) -> None:
        for _ in range(count):
            entity_id = pick_entity(args)
            sequence = int(await redis.incr(f"naive:{args.subject_prefix}:{entity_id}"))
            await asyncio.sleep(random.uniform(0, 0.002))  # the producer's own work
            subject = contract.subject_for(args.subject_prefix, args.entity_type, entity_id, 16)
            headers = {
                contract.HEADER_ENTITY_TYPE: args.entity_type,
                contract.HEADER_ENTITY_ID: entity_id,
                contract.HEADER_ENTITY_SEQUENCE: str(sequence),
                contract.HEADER_ENTITY_OPERATION: "update",
            }
            ack = await js.publish(subject, args.producer.encode(), headers=headers)
            out.write(
                json.dumps(
                    {
                        "key": uuid.uuid4().hex,
                        "entity": entity_id,
                        "sequence": sequence,
                        "stream_sequence": ack.seq,
                    }
                )
                + "\n"
            )

    await asyncio.gather(*(task(n) for n in split(args.events, args.tasks)))
    await redis.aclose()
    await nc.close()
    return 0


async def run_commit(args: argparse.Namespace, out: TextIO) -> int:
    """Read-modify-write rows of a shared store, then publish the new row version.

    With --lease the lease spans read, write and publish, so the stream follows the
    store's commit order (Entity-Version); without, replicas race.
    """
    redis = Redis.from_url(args.redis_url)
    async with AsyncSidecarClient(args.target, retry=PATIENCE) as client:

        async def transaction(row: str) -> dict[str, Any]:
            if args.lease == "no":
                version = await write_row(redis, args, row)
                await asyncio.sleep(random.uniform(0, 0.002))  # the producer's own work
                event = Event(args.entity_type, row, "update", headers=version_header(version))
                return {
                    "row": row,
                    "version": version,
                    "seq": (await client.publish(event)).sequence,
                }
            async with client.lease(args.entity_type, row, ttl=5.0, wait=60.0) as lease:
                version = await write_row(redis, args, row)
                event = Event(
                    args.entity_type,
                    row,
                    "update",
                    headers=version_header(version),
                    entity_version=version,
                )
                return {
                    "row": row,
                    "version": version,
                    "seq": (await lease.publish(event)).sequence,
                }

        async def task(count: int) -> None:
            for _ in range(count):
                out.write(json.dumps(await transaction(pick_entity(args))) + "\n")

        await asyncio.gather(*(task(n) for n in split(args.events, args.tasks)))
    await redis.aclose()
    return 0


async def write_row(redis: Redis, args: argparse.Namespace, row: str) -> int:
    """Read the row's version, write version + 1 (a plain, unguarded read-modify-write)."""
    key = f"row:{args.subject_prefix}:{row}"
    version = int(await redis.hget(key, "version") or 0) + 1
    await redis.hset(key, mapping={"version": version, "writer": args.producer})
    return version


def version_header(version: int) -> dict[str, str]:
    return {"X-Row-Version": str(version)}


async def run_lease_holder(args: argparse.Namespace, out: TextIO) -> int:
    """Take a lease, say so on stdout, wait for a line on stdin, then publish under it."""
    async with (
        AsyncSidecarClient(args.target, retry=PATIENCE) as client,
        client.lease(args.entity_type, "held", ttl=1.0, wait=10.0) as lease,
    ):
        print(f"acquired {lease.fencing_token}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        try:
            published = await lease.publish(Event(args.entity_type, "held", "update"))
            print(f"published {published.sequence}", flush=True)
        except SidecarError as error:
            print(f"refused {error.code.name} {error.message}", flush=True)
    return 0


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


def main() -> int:
    args = parse_args(sys.argv[1:])
    with open(args.out, "w") as out:
        runners = {
            "sidecar": run_sidecar,
            "naive": run_naive,
            "commit": run_commit,
            "lease-holder": run_lease_holder,
        }
        return asyncio.run(runners[args.mode](args, out))


if __name__ == "__main__":
    sys.exit(main())
