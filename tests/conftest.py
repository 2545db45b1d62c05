"""Shared fixtures: one nats-server and one redis-server per test session, unique names."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig

from tests.support.servers import NatsServer, RedisServer, SidecarProcess


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the session's servers."""
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def nats_server(session_dir: Path) -> Iterator[NatsServer]:
    """The session's nats-server (tests that break servers start their own)."""
    server = NatsServer(session_dir)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    """The session's redis-server."""
    server = RedisServer(session_dir)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def names() -> dict[str, str]:
    """A stream name and subject prefix no other test uses."""
    suffix = uuid.uuid4().hex[:10]
    return {"stream": f"T_{suffix}", "subject_prefix": f"t{suffix}", "lock_bucket": f"L_{suffix}"}


@pytest.fixture
def serve_config(
    nats_server: NatsServer, redis_server: RedisServer, names: dict[str, str]
) -> ServeConfig:
    """A sidecar config on the session's servers with this test's names."""
    return ServeConfig(
        nats_url=nats_server.url,
        redis_url=(redis_server.url,),
        stream=names["stream"],
        subject_prefix=names["subject_prefix"],
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        lock_ttl=2.0,
        lock_wait=5.0,
    )


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A plain NATS connection for looking at the stream."""
    client = await nats.connect(nats_server.url)
    yield client
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(client.close(), 5.0)


@pytest.fixture
async def app(serve_config: ServeConfig) -> AsyncIterator[SidecarApp]:
    """A sidecar running in the test's event loop (real NATS and Redis)."""
    sidecar = SidecarApp(serve_config)
    await sidecar.start()
    yield sidecar
    await sidecar.stop()


@dataclass
class World:
    """What a multi-process test works with: the session's servers, this test's names,
    a sidecar starter, a NATS connection and a scratch folder."""

    nats_server: NatsServer
    redis_server: RedisServer
    names: dict[str, str]
    sidecars: Callable[..., SidecarProcess]
    nc: NatsClient
    tmp_path: Path

    @property
    def stream(self) -> str:
        """This test's stream."""
        return self.names["stream"]


@pytest.fixture
def world(
    nats_server: NatsServer,
    redis_server: RedisServer,
    names: dict[str, str],
    sidecars: Callable[..., SidecarProcess],
    nc: NatsClient,
    tmp_path: Path,
) -> World:
    """The bundle most multi-process tests need."""
    return World(nats_server, redis_server, names, sidecars, nc, tmp_path)


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start sidecar processes; all are killed at the end of the test."""
    started: list[SidecarProcess] = []

    def start(name: str, **options: str) -> SidecarProcess:
        sidecar = SidecarProcess(tmp_path, name, options)
        sidecar.start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.kill()
