"""Beyond one machine: a 3-node NATS cluster, R3 stream and lock bucket, sidecars on
different nodes; the stream leader's node is killed during load and brought back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nats

from tests.support.load import (
    Producers,
    check_acked_replies_are_in_stream,
    run_verify,
    wait_for_messages,
)
from tests.support.servers import NatsClusterNode, SidecarProcess, start_cluster

PRODUCERS = 3
EVENTS_EACH = 400


async def test_leader_node_killed_during_load(
    sidecars: Callable[..., SidecarProcess], names: dict[str, str], tmp_path: Path
) -> None:
    nodes = start_cluster(tmp_path / "cluster")
    try:
        await _run(nodes, sidecars, names, tmp_path)
    finally:
        for node in nodes:
            node.kill()


async def _run(
    nodes: list[NatsClusterNode],
    sidecars: Callable[..., SidecarProcess],
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    running = [
        sidecars(
            f"sidecar-{n}",
            nats_url=node.url,
            stream=names["stream"],
            subject_prefix=names["subject_prefix"],
            lock_backend="nats-kv",
            lock_bucket=names["lock_bucket"],
            stream_replicas="3",
            kv_replicas="3",
            lock_ttl="2",
            publish_timeout="2",
        )
        for n, node in enumerate(nodes)
    ]
    producers = Producers(tmp_path)
    for n in range(PRODUCERS):
        producers.start(
            "sidecar",
            f"producer-{n}",
            target=running[n].target,
            entities=12,
            events=EVENTS_EACH,
            tasks=4,
        )
    total = PRODUCERS * EVENTS_EACH
    watcher = await nats.connect([node.url for node in nodes])
    try:
        await wait_for_messages(watcher, names["stream"], total // 4, timeout=120)
        info = await watcher.jsm().stream_info(names["stream"])
        assert info.cluster is not None and info.cluster.leader
        leader = next(node for node in nodes if node.name == info.cluster.leader)
        leader.kill()
        # Publishing goes on through the other two nodes, without restarting a sidecar.
        before_kill = info.state.messages
        assert before_kill + 100 < total, "the load ended before the leader was killed"
        await wait_for_messages(watcher, names["stream"], before_kill + 100, timeout=120)
        leader.start()
        assert await producers.wait(300) == [0] * PRODUCERS, producers.log_tail()
        replies = producers.replies()
        assert len(replies) == total and not [r for r in replies if "error" in r]
        stored = await check_acked_replies_are_in_stream(watcher, names["stream"], replies)
        assert len(stored) == total
    finally:
        await watcher.close()
    status, report = run_verify(nodes[0].url, names["stream"])
    assert report["patient"]["events"] == total
    assert status == 0, report
