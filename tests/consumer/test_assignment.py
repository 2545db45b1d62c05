"""Partition leases in a real KV bucket: replicas never hold one partition together, and
a replica that stops renewing stops fetching before a peer can take its partitions."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from order_sidecar_client.consumer import KvLeaseAssignment, LeaseConfig, StaticAssignment

from tests.support.consumer import wait_for

PARTITIONS = 8


async def test_leases_rebalance_without_overlap_and_lapse_safely(
    nc: NatsClient, names: dict[str, str]
) -> None:
    bucket = names["lock_bucket"]
    a = await KvLeaseAssignment.open(nc, LeaseConfig(bucket, "a", ttl=2.0))
    b = await KvLeaseAssignment.open(nc, LeaseConfig(bucket, "b", ttl=2.0))
    first = await a.refresh(PARTITIONS)
    assert first.keep == frozenset(range(PARTITIONS))
    assert (await b.refresh(PARTITIONS)).keep == frozenset()  # all taken: a result
    plan = await a.refresh(PARTITIONS)  # a now counts 2 members: keeps its share
    assert len(plan.keep) == 4 and len(plan.surplus) == 4
    for partition in plan.surplus:
        await a.release(partition)
    mine = (await b.refresh(PARTITIONS)).keep
    assert mine == plan.surplus
    assert not mine & plan.keep

    # a stops renewing (a paused replica): b may only get a's partitions once a has
    # stopped trusting its leases.
    async def b_took_everything() -> bool:
        taken = (await b.refresh(PARTITIONS)).keep
        if taken & plan.keep:
            assert not any(a.valid(p) for p in taken & plan.keep)
        return taken == frozenset(range(PARTITIONS))

    await wait_for(b_took_everything, 30, "b to take a's lapsed partitions")
    await b.close()


async def test_static_assignment_splits_by_index() -> None:
    shares = [await StaticAssignment(3, i).refresh(PARTITIONS) for i in range(3)]
    assert [sorted(s.keep) for s in shares] == [[0, 3, 6], [1, 4, 7], [2, 5]]
