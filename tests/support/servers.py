"""Real servers for tests: nats-server, redis-server and sidecars as child processes.

Each can be started on a free loopback port, killed (SIGKILL by PID), paused
(SIGSTOP), resumed and restarted. Readiness is waited for as a condition with a
deadline, never with a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from order_sidecar.jetstream.embedded import nats_server_binary

START_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *condition* until true; fail the test with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class ManagedProcess:
    """A child process with kill/pause/resume by PID and a log file."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def is_ready(self) -> bool:
        """Whether the server answers."""
        raise NotImplementedError

    def start(self) -> None:
        """Start and wait until ready."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=self._env()
            )
        wait_until(self._ready_or_dead, START_TIMEOUT, f"{self.name} to start")
        if not self.running:
            raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")

    def _ready_or_dead(self) -> bool:
        return not self.running or self.is_ready()

    @property
    def pid(self) -> int:
        """The child's PID."""
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the child has not exited."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.running:
            assert self.process is not None
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        os.kill(self.pid, signal.SIGCONT)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; wait for the exit status."""
        assert self.process is not None
        if self.running:
            os.kill(self.pid, signal.SIGCONT)
            self.process.terminate()
        return self.process.wait(timeout)

    def restart(self) -> None:
        """Kill, then start again with the same arguments."""
        self.kill()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the child's output."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class NatsServer(ManagedProcess):
    """nats-server with JetStream on file storage in *workdir*."""

    def __init__(self, workdir: Path, name: str = "nats", binary: str = "") -> None:
        super().__init__(name, workdir)
        self.port = free_port()
        self.monitor_port = free_port()
        self.store = workdir / f"{name}-store"
        self.binary = binary or nats_server_binary()

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-js",
            "-sd",
            str(self.store),
        ]

    def is_ready(self) -> bool:
        """JetStream answers the health endpoint."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False


class RedisServer(ManagedProcess):
    """redis-server that keeps nothing on disk: a restart loses every key."""

    def __init__(self, workdir: Path, name: str = "redis") -> None:
        super().__init__(name, workdir)
        self.port = free_port()

    @property
    def url(self) -> str:
        """Client URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        return [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]

    def is_ready(self) -> bool:
        """PING answers PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class SidecarProcess(ManagedProcess):
    """``order-sidecar serve`` as a child process."""

    def __init__(self, workdir: Path, name: str, options: dict[str, str]) -> None:
        super().__init__(name, workdir)
        self.port = free_port()
        self.options = options

    @property
    def target(self) -> str:
        """gRPC target."""
        return f"127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        options = {"metrics_listen": "127.0.0.1:0", **self.options}
        # An empty value is a bare flag (e.g. no_group_commit="" -> --no-group-commit).
        flags = [
            f"--{key.replace('_', '-')}" + (f"={value}" if value else "")
            for key, value in options.items()
        ]
        return [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "serve",
            f"--listen={self.target}",
            f"--producer-id={self.name}",
            *flags,
        ]

    def is_ready(self) -> bool:
        """gRPC health says SERVING."""
        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False


class NatsClusterNode(NatsServer):
    """One node of a JetStream cluster with routes to its peers on loopback."""

    def __init__(self, workdir: Path, name: str) -> None:
        super().__init__(workdir, name)
        self.cluster_port = free_port()
        self.peers: list[NatsClusterNode] = []

    def _command(self) -> list[str]:
        routes = ",".join(f"nats://127.0.0.1:{peer.cluster_port}" for peer in self.peers)
        return [
            *super()._command(),
            "-n",
            self.name,
            "--cluster_name",
            "orders",
            "--cluster",
            f"nats://127.0.0.1:{self.cluster_port}",
            "--routes",
            routes,
        ]

    def is_ready(self) -> bool:
        """The node answers and knows the JetStream meta leader."""
        try:
            url = f"http://127.0.0.1:{self.monitor_port}/jsz"
            with urllib.request.urlopen(url, timeout=1) as response:
                meta = json.load(response).get("meta_cluster") or {}
                return bool(meta.get("leader"))
        except (OSError, ValueError):
            return False


def start_cluster(workdir: Path, size: int = 3) -> list[NatsClusterNode]:
    """Start *size* nodes that route to each other; wait until they elected a meta leader."""
    nodes = [NatsClusterNode(workdir, f"node-{n}") for n in range(size)]
    for node in nodes:
        node.peers = [peer for peer in nodes if peer is not node]
    with ThreadPoolExecutor(size) as pool:
        list(pool.map(lambda node: node.start(), nodes))
    return nodes
