"""The bench command runs against a real sidecar and reports every event (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.load import sidecar_options
from tests.support.servers import NatsServer, RedisServer, SidecarProcess


def test_bench_measures_unary_and_batch(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    tmp_path: Path,
) -> None:
    sidecar = sidecars("bench", **sidecar_options(nats_server, redis_server, names))
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "bench",
            f"--target={sidecar.target}",
            "--events=300",
            "--entities=10",
            "--batch-size=50",
            f"--json-out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["events"], r["failed"]) for r in rows] == [(300, 0)] * 4
    assert rows[2]["mode"] == "PublishStream"
    assert "lease round" in rows[1]["mode"]
    assert all(r["events_per_s"] > 0 for r in rows)


def test_bench_suite_measures_everything_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "bench",
            "--suite",
            "--events=120",
            "--suite-payloads=256",
            "--suite-entities=1",
            "--batch-size=20",
            "--suite-rss-entities=300",
            f"--json-out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    memory = saved["memory"]
    assert memory["entities"] == 300 and memory["failed"] == 0
    # Per-entity state is let go once idle: no lock kept, no entity busy.
    assert memory["locks_held_idle"] == 0 and memory["entities_busy_idle"] == 0
    assert 0 < memory["rss_start_mb"] <= memory["rss_loaded_mb"]
    assert "memory of one sidecar (T5)" in result.stdout
    modes = [(r["setting"], r["mode"]) for r in rows]
    assert ("256 B", "raw publish_async, 64 in flight") in modes
    assert ("256 B", "grpc.aio echo, 64 in flight") in modes
    assert ("256 B, 1 ent, 3 sc", "Publish (unary)") in modes
    assert all(r["failed"] == 0 and r["events_per_s"] > 0 for r in rows)
    assert [r["ratio"] for r in rows if r["mode"].startswith("raw publish_async")] == [1.0]
    assert "bench: 256 B, 1 entities, 3 sidecar(s)" in result.stderr
