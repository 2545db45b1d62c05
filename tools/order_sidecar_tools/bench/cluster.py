"""The suite's 3-node cluster rows: an R3 stream, one sidecar, against raw publish.

``NatsCluster`` starts three nats-server processes with JetStream on loopback, routed
to each other, and waits until every node knows the JetStream meta leader. On it: raw
pipelined ``publish_async`` to an R3 stream (the rows' baseline), then one sidecar whose
stream and lock bucket are R3, with ``PublishBatch`` over 1,000 entities.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

from order_sidecar.jetstream.embedded import free_port, nats_server_binary

from order_sidecar_tools.bench.baselines import raw_publish
from order_sidecar_tools.bench.processes import start_sidecars
from order_sidecar_tools.bench.rows import SuiteContext, SuiteRow, progress
from order_sidecar_tools.bench.runner import BenchConfig, run_batch_mode

CLUSTER_SIZE = 3
CLUSTER_ENTITIES = 1000
PAYLOAD_BYTES = 256
_START_DEADLINE = 30.0


class ClusterNode:
    """One nats-server of the cluster: client, monitor and route ports on loopback."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.workdir = workdir
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, routes: list[str]) -> None:
        """Spawn the server (its output in ``<workdir>/<name>.log``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            nats_server_binary(),
            *("-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)),
            *("-js", "-sd", str(self.workdir / f"{self.name}-store"), "-n", self.name),
            *("--cluster_name", "bench", "--cluster", f"nats://127.0.0.1:{self.cluster_port}"),
            *("--routes", ",".join(routes)),
        ]
        with (self.workdir / f"{self.name}.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def knows_meta_leader(self) -> bool:
        """The node answers its monitor port and names the JetStream meta leader."""
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/jsz"
            with urllib.request.urlopen(url, timeout=1) as response:
                meta = json.load(response).get("meta_cluster") or {}
                return bool(meta.get("leader"))
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


class NatsCluster:
    """*size* routed nats-server nodes with JetStream, started and stopped together."""

    def __init__(self, workdir: Path, size: int = CLUSTER_SIZE) -> None:
        self.nodes = [ClusterNode(workdir, f"node-{n}") for n in range(size)]

    async def start(self) -> list[str]:
        """Start every node; wait until each knows the meta leader. The client URLs."""
        for node in self.nodes:
            routes = [f"nats://127.0.0.1:{p.cluster_port}" for p in self.nodes if p is not node]
            node.start(routes)
        deadline = time.monotonic() + _START_DEADLINE
        for node in self.nodes:
            while not await asyncio.to_thread(node.knows_meta_leader):
                exited = node.process is not None and node.process.poll() is not None
                if exited or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nats cluster node {node.name} did not start")
                await asyncio.sleep(0.1)
        return [node.url for node in self.nodes]

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def cluster_setting() -> str:
    """The setting column of the cluster rows (targets find rows by it)."""
    return f"{PAYLOAD_BYTES} B, {CLUSTER_ENTITIES} ent, R3 cluster"


async def run_cluster(ctx: SuiteContext) -> list[SuiteRow]:
    """Raw pipelined publish, then one sidecar's PublishBatch, on an R3 stream."""
    config = ctx.config
    cluster = NatsCluster(ctx.scratch / "cluster")
    progress(f"cluster: starting {CLUSTER_SIZE} nats-server nodes")
    url = (await cluster.start())[0]
    try:
        progress("cluster: raw publish_async to an R3 stream, then 1 sidecar")
        body = b"x" * PAYLOAD_BYTES
        raw = await raw_publish(url, config.events, body, CLUSTER_ENTITIES, 64, replicas=3)
        name = f"BENCH_{uuid.uuid4().hex[:8]}"
        replicas = [f"--stream-replicas={CLUSTER_SIZE}", f"--kv-replicas={CLUSTER_SIZE}"]
        (child,) = await start_sidecars(url, 1, name, config.suite_redis_url, replicas)
        try:
            cell = BenchConfig(
                events=config.events,
                entities=CLUSTER_ENTITIES,
                concurrency=config.concurrency,
                batch_size=config.batch_size,
                payload_bytes=PAYLOAD_BYTES,
            )
            batch = await run_batch_mode(cell, child.target)
            batch.mode = f"{batch.mode}, 1 sc"
        finally:
            child.stop()
    finally:
        cluster.stop()
    rows = [SuiteRow(cluster_setting(), r, group="cluster") for r in (raw, batch)]
    for item in rows:
        item.divide_by(raw, "raw R3 pipelined")
    return rows
