"""The contract from a second language: the Node.js client (clients/node) against a real
sidecar, and what it published read back from the stream with nats-py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from nats.aio.client import Client as NatsClient

from tests.support.helpers import StoredMessage, stream_messages
from tests.support.servers import NatsServer, RedisServer, SidecarProcess

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


def node_binary() -> str:
    """node, with its packages installed; skip locally when missing, fail in CI."""
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
    if node and installed:
        return node
    message = (
        "node is not installed"
        if not node
        else "clients/node has no node_modules: run (cd clients/node && npm ci)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_node(node: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, *args],
        cwd=NODE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def of_entity(
    messages: list[StoredMessage], entity_type: str, entity_id: str
) -> list[StoredMessage]:
    return [
        m
        for m in messages
        if m.headers.get("Entity-Type") == entity_type and m.headers.get("Entity-Id") == entity_id
    ]


@pytest.fixture
def sidecar(
    sidecars: Callable[..., SidecarProcess],
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
) -> SidecarProcess:
    return sidecars(
        "node-target",
        nats_url=nats_server.url,
        redis_url=redis_server.url,
        stream=names["stream"],
        subject_prefix=names["subject_prefix"],
    )


async def test_node_client_publishes_in_order(
    sidecar: SidecarProcess, nc: NatsClient, names: dict[str, str], tmp_path: Path
) -> None:
    node = node_binary()
    run_id = uuid.uuid4().hex[:8]
    results_file = tmp_path / "node-results.json"
    result = run_node(
        node,
        ["--test", "--test-reporter=tap", "test/client.test.js"],
        {
            "SIDECAR_TARGET": sidecar.target,
            "SIDECAR_TEST_ID": run_id,
            "SIDECAR_TEST_RESULTS": str(results_file),
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Every Node test ran; none was skipped (a missing target would skip them all).
    assert "# pass 7" in output and "# skipped 0" in output, output
    node_results: dict[str, Any] = json.loads(results_file.read_text())

    messages = await stream_messages(nc, names["stream"])

    # The ordered entity: create, update, delete at sequences 1-3, as Node was told.
    ordered = node_results["ordered"]
    found = of_entity(messages, "patient", ordered["entityId"])
    assert [m.headers["Entity-Sequence"] for m in found] == ["1", "2", "3"]
    assert [m.headers["Entity-Operation"] for m in found] == ["create", "update", "delete"]
    assert [json.loads(m.payload) for m in found] == [
        {"operation": op} for op in ("create", "update", "delete")
    ]
    assert all(m.headers["x-source"] == "node" for m in found)
    assert [m.stream_sequence for m in found] == [
        int(p["streamSequence"]) for p in ordered["published"]
    ]
    assert {m.subject for m in found} == {p["subject"] for p in ordered["published"]}
    assert all(m.subject.startswith(f"{names['subject_prefix']}.patient.") for m in found)

    # The repeated idempotency key landed once.
    duplicate = node_results["duplicate"]
    assert len(of_entity(messages, "patient", duplicate["entityId"])) == 1

    # The batch: both valid entities in order, the invalid id refused and absent.
    ids = node_results["batch"]["ids"]
    assert node_results["batch"]["codes"] == [0, 0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert [m.headers["Entity-Sequence"] for m in of_entity(messages, "order", ids[0])] == [
        "1",
        "2",
    ]
    assert len(of_entity(messages, "order", ids[1])) == 1
    assert not of_entity(messages, "order", ids[3])

    # Bad input from Node: INVALID_ARGUMENT, and nothing of it in the stream.
    invalid = node_results["invalid"]
    assert invalid["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid["codeName"] == "INVALID_ARGUMENT"
    assert not [m for m in messages if m.headers.get("Entity-Id") == invalid["entityId"]]

    # The leased update carries the entity version Node gave.
    leased = of_entity(messages, "patient", node_results["leased"]["entityId"])
    assert [m.headers["Entity-Sequence"] for m in leased] == ["1", "2"]
    assert leased[1].headers["Entity-Version"] == "7"
    assert "Entity-Version" not in leased[0].headers

    # The packed stream: each entity's payloads in the order sent, at sequences 1-100; of
    # the entity with an invalid event only the event before it; the async stream's 40.
    stream = node_results["stream"]
    for number, entity_id in enumerate(stream["ids"]):
        found = of_entity(messages, "order", entity_id)
        assert [m.headers["Entity-Sequence"] for m in found] == [str(n) for n in range(1, 101)]
        assert [int(m.payload) for m in found] == list(range(number, 300, 3))
    assert [m.payload for m in of_entity(messages, "order", stream["bad"])] == [b"bad1"]
    assert len(of_entity(messages, "order", stream["single"])) == 40

    # Nothing else was published: 3 + 1 + 3 + 2 events, and 300 + 1 + 40 streamed.
    assert len(messages) == 9 + 341


async def test_node_example_runs(
    sidecar: SidecarProcess, nc: NatsClient, names: dict[str, str]
) -> None:
    node = node_binary()
    result = run_node(node, ["example.js", sidecar.target], {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "create -> sequence 1" in result.stdout, result.stdout
    messages = await stream_messages(nc, names["stream"])
    patient = of_entity(messages, "patient", "42")
    assert [m.headers["Entity-Operation"] for m in patient] == ["create", "update"]
    assert patient[1].headers["Entity-Version"] == "2"
    assert [m.headers["Entity-Sequence"] for m in of_entity(messages, "order", "A-1")] == [
        "1",
        "2",
    ]
