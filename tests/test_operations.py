"""Metrics and health as an operator sees them: real Prometheus, promtool, real faults."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import AsyncSidecarClient, Event, RetryPolicy, SidecarClient, SidecarError
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.load import sidecar_options
from tests.support.servers import ManagedProcess, NatsServer, RedisServer, SidecarProcess, free_port

QUICK = RetryPolicy(attempts=1, attempt_timeout=10.0)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def _until(condition: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_counters_move_with_outcomes(app: SidecarApp) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        first = Event("order", "m1", "create", entity_version=2)
        await client.publish(first)
        await client.publish(first)  # duplicate
        for bad in (
            Event("bad type", "m1", "create"),
            Event("order", "m1", "update", entity_version=1),
        ):
            with pytest.raises(SidecarError):
                await client.publish(bad)
    values = samples(scrape(app.metrics_port))
    results = {
        dict(labels)["outcome"]: value
        for (name, labels), value in values.items()
        if name == "ordersidecar_publish_results_total"
    }
    assert results == {"ok": 1, "duplicate": 1, "invalid": 1, "stale": 1}
    assert values[("ordersidecar_rpc_seconds_count", (("outcome", "ok"), ("rpc", "Publish")))] == 2
    assert values[("ordersidecar_build_info", (("version", "0.1.0"),))] == 1
    assert not any("entity_id" in dict(labels) for _, labels in values)
    # The entity's lock lingers for its next event, then is let go.
    held = ("ordersidecar_locks_held", (("backend", "redis"),))
    assert values[held] == 1
    deadline = time.monotonic() + app.config.lock_linger + 5
    while samples(scrape(app.metrics_port))[held] != 0:
        assert time.monotonic() < deadline, "the lingering lock was never let go"
        await asyncio.sleep(0.05)


async def test_contention_is_counted(serve_config: ServeConfig) -> None:
    holder, other = SidecarApp(serve_config), SidecarApp(serve_config)
    await holder.start()
    await other.start()
    try:
        async with (
            AsyncSidecarClient(holder.target, retry=QUICK) as first,
            AsyncSidecarClient(other.target, retry=QUICK) as second,
            first.lease("order", "busy", ttl=5),
        ):
            with pytest.raises(SidecarError):
                async with second.lease("order", "busy", wait=0.2):
                    pass
        values = samples(scrape(other.metrics_port))
        timeout = (
            "ordersidecar_lock_acquire_seconds_count",
            (("backend", "redis"), ("outcome", "timeout")),
        )
        assert values[timeout] == 1
        assert values[("ordersidecar_lock_contended_total", (("backend", "redis"),))] >= 1
    finally:
        await holder.stop()
        await other.stop()


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool not installed (.ci/run installs prometheus)"
)
async def test_promtool_accepts_the_exposition(app: SidecarApp) -> None:
    async with AsyncSidecarClient(app.target, retry=QUICK) as client:
        await client.publish(Event("order", "p1", "create"))
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape(app.metrics_port),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


class PrometheusServer(ManagedProcess):
    """A real Prometheus that scrapes one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        super().__init__("prometheus", workdir)
        self.port = free_port()
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n"
            f"  - job_name: sidecar\n    static_configs:\n      - targets: ['{target}']\n"
        )

    def _command(self) -> list[str]:
        return [
            "prometheus",
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def query(self, expression: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.parse.quote(expression)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.load(response)["data"]["result"])


@pytest.mark.skipif(
    not shutil.which("prometheus"), reason="prometheus not installed (.ci/run installs it)"
)
async def test_prometheus_scrapes_a_sidecar_under_load(app: SidecarApp, tmp_path: Path) -> None:
    prometheus = PrometheusServer(tmp_path, f"127.0.0.1:{app.metrics_port}")
    prometheus.start()
    try:
        async with AsyncSidecarClient(app.target, retry=QUICK) as client:
            events = [Event("order", f"l{n % 10}", "update") for n in range(300)]
            async for _ in client.publish_stream(events):
                pass

        async def published_seen() -> bool:
            found = prometheus.query('sum(ordersidecar_publish_results_total{outcome="ok"})')
            return bool(found) and float(found[0]["value"][1]) == 300  # type: ignore[index]

        await _until(published_seen, 30, "Prometheus to scrape 300 ok results")
        acquires = prometheus.query('ordersidecar_lock_acquire_seconds_count{outcome="acquired"}')
        assert acquires and float(acquires[0]["value"][1]) >= 10  # type: ignore[index]
        up = prometheus.query('ordersidecar_backend_up{backend="nats"}')
        assert up and up[0]["value"][1] == "1"  # type: ignore[index]
    finally:
        prometheus.kill()


async def test_health_follows_nats(serve_config: ServeConfig, tmp_path: Path) -> None:
    nats_server = NatsServer(tmp_path)
    nats_server.start()
    app = SidecarApp(
        dataclasses.replace(serve_config, nats_url=nats_server.url, health_interval=0.2)
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status_is(wanted: int) -> object:
                async def check() -> bool:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return bool(reply.status == wanted)

                return check

            await _until(status_is(health_pb2.HealthCheckResponse.SERVING), 10, "SERVING")
            nats_server.kill()
            await _until(status_is(health_pb2.HealthCheckResponse.NOT_SERVING), 10, "NOT_SERVING")
            down = samples(scrape(app.metrics_port))
            assert down[("ordersidecar_backend_up", (("backend", "nats"),))] == 0
            nats_server.start()
            await _until(status_is(health_pb2.HealthCheckResponse.SERVING), 30, "SERVING again")
            reconnects = samples(scrape(app.metrics_port))
            assert reconnects[("ordersidecar_nats_reconnects_total", ())] >= 1
    finally:
        await app.stop()
        nats_server.kill()


def test_json_logs_have_one_line_per_failure_without_payloads(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecars(
        "json-logs", log_format="json", **sidecar_options(nats_server, redis_server, names)
    )
    secret = b"SECRET-PAYLOAD-123"
    with SidecarClient(sidecar.target, retry=QUICK) as client:
        client.publish(Event("patient", "p1", "create", secret, entity_version=5))
        for bad in (
            Event("patient", "p1", "update", secret, headers={"Nats-X": "1"}),
            Event("patient", "p1", "update", secret, entity_version=4),
        ):
            with pytest.raises(SidecarError):
                client.publish(bad)
    assert sidecar.terminate() == 0
    lines = [json.loads(line) for line in sidecar.log_path.read_text().splitlines() if line]
    failures = [line for line in lines if line.get("rpc") == "Publish"]
    assert [(f["code"], f["reason"]) for f in failures] == [
        ("INVALID_ARGUMENT", "InvalidEvent"),
        ("FAILED_PRECONDITION", "PreconditionFailed"),
    ]
    assert all(f["entity_type"] == "patient" and f["duration_ms"] >= 0 for f in failures)
    assert secret.decode() not in sidecar.log_path.read_text()


def test_status_command_shows_state_and_last_errors(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecars("status", **sidecar_options(nats_server, redis_server, names))
    with SidecarClient(sidecar.target, retry=QUICK) as client:
        client.publish(Event("patient", "s1", "create", b"PAYLOAD-NOT-SHOWN"))
        with pytest.raises(SidecarError):
            client.publish(Event("patient", "s1", "update", headers={"Entity-X": "1"}))
    command = [sys.executable, "-m", "order_sidecar.cli", "status", f"--target={sidecar.target}"]
    table = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "producer                 status" in table
    assert "nats                     connected" in table
    assert "lock backend             redis (up)" in table
    assert "published                1" in table
    assert "Publish INVALID_ARGUMENT patient: header 'Entity-X' is reserved" in table
    assert "PAYLOAD-NOT-SHOWN" not in table
    as_json = json.loads(
        subprocess.run(
            [*command, "--json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    assert as_json["published"] == "1" and as_json["last_errors"][0]["code"] == "INVALID_ARGUMENT"
    down = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "status", "--target=127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 2 and "did not answer" in down.stderr


async def test_redis_reconnects_are_counted(serve_config: ServeConfig, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    app = SidecarApp(dataclasses.replace(serve_config, redis_url=(redis.url,), health_interval=0.2))
    await app.start()
    try:

        def value(name: str) -> float | None:
            return samples(scrape(app.metrics_port)).get((name, (("backend", "redis"),)))

        async def down() -> bool:
            return value("ordersidecar_backend_up") == 0

        async def back() -> bool:
            return value("ordersidecar_lock_backend_reconnects_total") == 1

        redis.kill()
        await _until(down, 10, "redis to be seen down")
        redis.start()
        await _until(back, 10, "the reconnect to be counted")
        assert value("ordersidecar_backend_up") == 1
    finally:
        await app.stop()
        redis.kill()


async def test_locks_held_does_not_drift_when_callers_vanish(app: SidecarApp) -> None:
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        request = sidecar_pb2.AcquireLeaseRequest(entity_type="order", entity_id="gone")
        request.ttl.FromMilliseconds(500)
        first = await stub.AcquireLease(request)  # never released, never renewed

        async def expired() -> bool:
            return time.time() > first.expires_at.ToNanoseconds() / 1e9

        await _until(expired, 5, "the lease to expire")
        await stub.AcquireLease(
            sidecar_pb2.AcquireLeaseRequest(entity_type="order", entity_id="other")
        )
    held = app.metrics.registry.get_sample_value("ordersidecar_locks_held", {"backend": "redis"})
    assert held == 1
