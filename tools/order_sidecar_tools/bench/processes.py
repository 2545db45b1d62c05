"""The suite's helper processes: sidecars on one stream, and a bare gRPC echo server.

Run as ``python -m order_sidecar_tools.bench.processes PORT`` it is the echo server.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from order_sidecar.jetstream.embedded import free_port

ECHO_METHOD = "/ordersidecar.bench.Echo/Echo"


class Child:
    """A helper process of the suite (echo server or sidecar), stopped at the end."""

    def __init__(self, args: list[str], port: int) -> None:
        self.target = f"127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_ready(self, health: bool) -> None:
        """Wait until it answers (gRPC health, or any connection for the echo server)."""
        deadline = time.monotonic() + 30
        while not await self._answers(health):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench helper {self.process.args!r} did not start")
            await asyncio.sleep(0.05)

    async def _answers(self, health: bool) -> bool:
        try:
            async with grpc.aio.insecure_channel(self.target) as channel:
                if health:
                    stub = health_pb2_grpc.HealthStub(channel)
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
                echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    ECHO_METHOD
                )
                await echo(b"", timeout=1)
                return True
        except grpc.RpcError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def start_sidecars(
    url: str, count: int, name: str, redis_url: str = "", extra: Sequence[str] = ()
) -> list[Child]:
    """*count* sidecar processes on one stream, with nats-kv locks or Redis ones; *extra*:
    more ``serve`` flags."""
    children = []
    locks = [f"--redis-url={redis_url}"] if redis_url else ["--lock-backend=nats-kv"]
    for n in range(count):
        port = free_port()
        children.append(
            Child(
                [
                    "order_sidecar.cli",
                    "serve",
                    f"--nats-url={url}",
                    f"--listen=127.0.0.1:{port}",
                    f"--stream={name}",
                    f"--subject-prefix={name.lower()}",
                    *locks,
                    f"--lock-bucket={name}_LOCKS",
                    f"--producer-id=bench-{n}",
                    "--log-level=WARNING",
                    "--metrics-listen=",
                    *extra,
                ],
                port,
            )
        )
    try:
        for child in children:
            await child.wait_ready(health=True)
    except BaseException:
        for child in children:
            child.stop()
        raise
    return children


async def serve_echo(port: int) -> None:
    """The bare echo server: a generic handler, no protobuf work."""
    server = grpc.aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("ordersidecar.bench.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


if __name__ == "__main__":
    asyncio.run(serve_echo(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0))
