"""The embedded default: `order-sidecar serve` with no --nats-url needs no other service."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from order_sidecar_client import Event as ClientEvent
from order_sidecar_client import SidecarClient

from tests.support.servers import SidecarProcess


def _processes_using(folder: Path) -> list[str]:
    result = subprocess.run(
        ["pgrep", "-af", str(folder)], capture_output=True, text=True, check=False
    )
    return [line for line in result.stdout.splitlines() if "nats-server" in line]


def test_serve_without_nats_url_runs_its_own_server_and_stops_it(
    sidecars: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "embedded-data"
    sidecar = sidecars("embedded", data_dir=str(data_dir))
    assert _processes_using(data_dir), "no embedded nats-server is running"
    with SidecarClient(sidecar.target) as client:
        first = client.publish(ClientEvent("patient", "42", "create", b"{}"))
        with client.lease("patient", "42") as lease:
            second = lease.publish(ClientEvent("patient", "42", "update", b"{}"))
    assert (first.sequence, second.sequence) == (1, 2)
    log = sidecar.log_path.read_text()
    assert f"JetStream data in {data_dir}" in log
    assert "locks: nats-kv" in log
    assert sidecar.terminate() == 0
    assert not _processes_using(data_dir), "the embedded nats-server outlived the sidecar"
    assert (data_dir / "jetstream").is_dir()


def test_demo_shows_the_problem_and_the_fix() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "demo", "--events", "600", "--entities", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    naive, fixed = rows["naive publishing"], rows["through sidecars"]
    assert naive[2:4] == ["600", "5"] and fixed[2:4] == ["600", "5"]
    assert fixed[4:7] == ["0", "0", "0"], "sidecars let a gap, duplicate or inversion through"
    assert "through sidecars every entity is in order" in result.stdout
    assert "through sidecars: 600/600 events" in result.stderr


async def test_embedded_server_takes_the_sync_interval(tmp_path: Path) -> None:
    import nats as nats_client
    from order_sidecar.jetstream.embedded import EmbeddedNats

    server = EmbeddedNats(tmp_path / "sync", sync_interval="always")
    url = await server.start()
    try:
        assert "sync_interval: always" in (tmp_path / "sync" / "embedded.conf").read_text()
        nc = await nats_client.connect(url)
        ack = await nc.jetstream().add_stream(name="SYNCED", subjects=["synced.>"])
        assert ack.config.name == "SYNCED"
        await nc.close()
    finally:
        server.stop()
    assert not _processes_using(tmp_path / "sync")
