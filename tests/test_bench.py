"""The bench command runs against a real sidecar and reports every event (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _suite(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "bench",
            "--suite",
            *flags,
            f"--json-out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text())


def test_bench_suite_measures_everything_side_by_side(tmp_path: Path) -> None:
    result, saved = _suite(
        tmp_path,
        "--events=120",
        "--suite-payloads=256",
        "--suite-entities=1,1000",
        "--batch-size=20",
        "--suite-rss-entities=2000",
    )
    rows = saved["rows"]
    memory = saved["memory"]
    assert saved["groups"] == ["grid", "consumer", "latency", "cluster", "memory"]
    assert memory["entities"] == 2000 and memory["failed"] == 0
    assert memory["batch_events"] == 1000
    # Per-entity state is let go once idle: no lock kept, no entity busy.
    assert memory["locks_held_idle"] == 0 and memory["entities_busy_idle"] == 0
    assert 0 < memory["rss_start_mb"] <= memory["rss_loaded_mb"]
    assert "memory of one sidecar (T5)" in result.stdout
    modes = {(r["group"], r["setting"], r["mode"]) for r in rows}
    assert ("grid", "256 B", "raw publish_async, 64 in flight") in modes
    assert ("grid", "256 B", "grpc.aio echo, 64 in flight") in modes
    assert ("grid", "256 B, 1 ent, 3 sc", "Publish (unary)") in modes
    assert ("grid", "256 B, 1000 ent, 1 sc", "PublishBatch (20/call)") in modes
    assert all(r["failed"] == 0 and r["events_per_s"] > 0 for r in rows)
    assert [
        r["ratio"]
        for r in rows
        if r["baseline"] == "raw pipelined" and "raw publish_a" in r["mode"]
    ] == [1.0]
    assert "bench: 256 B, 1 entities, 3 sidecar(s)" in result.stderr
    _check_new_groups(rows)
    _check_targets(saved["targets"], result.stdout)


def _check_new_groups(rows: list[dict[str, Any]]) -> None:
    by_group: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    hot = [r for r in by_group["grid"] if r["setting"] == "256 B, 1 ent, 3 sc"]
    unary = next(r for r in hot if r["mode"] == "Publish (unary)")
    # Calls go round robin: every sidecar publishes a share of the events.
    assert len(unary["shares"]) == 3 and all(share > 0 for share in unary["shares"])
    assert [r["mode"] for r in by_group["consumer"]] == [
        "raw pull fetch+ack, 100/fetch",
        "ordered consumer, 1 replica (SQLite)",
        "ordered consumer, 3 replicas (SQLite)",
    ]
    assert {r["events"] for r in by_group["consumer"]} == {240}
    assert {r["baseline"] for r in by_group["consumer"]} == {"raw pull"}
    latency = by_group["latency"]
    assert [r["mode"] for r in latency] == [
        "Publish (unary), 1000 ent, 1 sc",
        "raw publish, await its ack",
        "grpc.aio echo",
    ]
    assert {r["setting"] for r in latency} == {"256 B, 100 calls/s open loop"}
    assert all(r["ratio"] is None and r["call_p99_ms"] > 0 for r in latency)
    cluster = by_group["cluster"]
    assert [(r["setting"], r["mode"]) for r in cluster] == [
        ("256 B, 1000 ent, R3 cluster", "raw publish_async, 64 in flight"),
        ("256 B, 1000 ent, R3 cluster", "PublishBatch (20/call), 1 sc"),
    ]
    assert [r["baseline"] for r in cluster] == ["raw R3 pipelined"] * 2
    assert [r["setting"] for r in by_group["memory"]] == ["256 B, 2000 new ent, 1 sc (T5)"]


def _check_targets(targets: list[dict[str, Any]], stdout: str) -> None:
    assert [t["target"] for t in targets] == [
        *["T1", "T1", "T2", "T2", "T3", "T3", "T4", "T5", "T6", "T6", "T7", "R3", "R3"]
    ]
    measured = {t["target"] for t in targets if t["ratio"] is not None}
    assert measured == {"T1", "T2", "T4", "T5", "T6", "T7", "R3"}  # T3: no 10 KB row here
    t7 = next(t for t in targets if t["target"] == "T7")
    assert t7["added_p99_ms"] is not None and "added p99" in t7["text"]
    assert "sidecar shares" in next(t for t in targets if t["target"] == "T4")["text"]
    for line in targets:
        assert line["text"] in stdout
        assert line["baseline"] in line["text"]


def test_bench_suite_only_runs_the_named_groups(tmp_path: Path) -> None:
    _, saved = _suite(tmp_path, "--events=50", "--suite-only=latency")
    assert saved["groups"] == ["latency"] and saved["memory"] is None
    assert {r["group"] for r in saved["rows"]} == {"latency"}
    assert "not measured in this run" in next(t["text"] for t in saved["targets"])
    wrong = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "bench", "--suite", "--suite-only=nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert wrong.returncode != 0 and "--suite-only" in wrong.stdout + wrong.stderr
