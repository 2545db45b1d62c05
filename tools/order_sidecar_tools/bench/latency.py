"""The suite's latency rows at light load (target T7): open loop, paced by a schedule.

Calls start at a fixed rate (``--suite-latency-rate``, 100/s by default) whether or not
earlier ones were answered, and each latency runs from the call's scheduled start, so a
stall shows in the figures instead of slowing the load (no coordinated omission). Side
by side at the same rate: unary ``Publish`` through one sidecar over 1,000 entities, raw
nats-py publish awaiting its ack, and the bare gRPC echo. The sidecar's "added p99" is
its p99 minus the two others' (target lines).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import nats
import nats.errors
from nats.js.api import StreamConfig
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar_tools.bench.processes import ECHO_METHOD, start_sidecars
from order_sidecar_tools.bench.rows import SuiteContext, SuiteRow, progress
from order_sidecar_tools.bench.runner import BenchRow, make_row

LATENCY_ENTITIES = 1000
PAYLOAD_BYTES = 256
WARM_UP_CALLS = 10
CALLS_PER_SUITE_EVENT = 0.2
"""The latency rows make this many calls per ``--events`` (each row)."""
SIDECAR_MODE = f"Publish (unary), {LATENCY_ENTITIES} ent, 1 sc"
RAW_MODE = "raw publish, await its ack"
ECHO_MODE = "grpc.aio echo"

Call = Callable[[int], Awaitable[object]]
_FAILURES = (grpc.aio.AioRpcError, nats.errors.Error, asyncio.TimeoutError)


def latency_setting(rate: float) -> str:
    """The setting column of the latency rows (targets find rows by it)."""
    return f"{PAYLOAD_BYTES} B, {rate:g} calls/s open loop"


async def run_latency(ctx: SuiteContext) -> list[SuiteRow]:
    """The three open-loop rows at ``--suite-latency-rate``."""
    rate = ctx.config.suite_latency_rate
    calls = max(20, int(ctx.config.events * CALLS_PER_SUITE_EVENT))
    progress(f"latency: {calls} calls at {rate:g}/s each: sidecar, raw NATS, gRPC echo")
    measured = [
        await _sidecar(ctx, calls, rate),
        await _raw(ctx.url, calls, rate),
        await _echo(ctx.echo_target, calls, rate),
    ]
    return [SuiteRow(latency_setting(rate), row, group="latency") for row in measured]


async def paced(mode: str, calls: int, rate: float, call: Call) -> BenchRow:
    """*calls* calls of *call*, one every 1/*rate* s on a schedule (open loop), after a
    few unmeasured warm-up calls; latency from each call's scheduled start."""
    for n in range(WARM_UP_CALLS):
        await call(-1 - n)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: list[str] = []

    async def one(n: int, due: float) -> None:
        try:
            await call(n)
        except _FAILURES as error:
            failures.append(f"{type(error).__name__}: {error}")
        latencies.append(loop.time() - due)

    begin = loop.time() + 0.01
    tasks = []
    for n in range(calls):
        due = begin + n / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one(n, due)))
    await asyncio.gather(*tasks)
    return make_row(mode, calls, failures, loop.time() - begin, latencies)


async def _sidecar(ctx: SuiteContext, calls: int, rate: float) -> BenchRow:
    name = f"BENCH_{uuid.uuid4().hex[:8]}"
    (child,) = await start_sidecars(ctx.url, 1, name, ctx.config.suite_redis_url)
    run = name[-8:]
    payload = b"x" * PAYLOAD_BYTES
    try:
        async with grpc.aio.insecure_channel(child.target) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)

            async def publish(n: int) -> object:
                request = sidecar_pb2.PublishRequest(
                    entity_type="bench",
                    entity_id=f"t{run}-{n % LATENCY_ENTITIES}" if n >= 0 else f"w{run}{n}",
                    operation=sidecar_pb2.OPERATION_UPDATE,
                    payload=payload,
                    idempotency_key=f"t{run}-{n}",
                )
                return await stub.Publish(request, timeout=30)

            return await paced(SIDECAR_MODE, calls, rate, publish)
    finally:
        child.stop()


async def _raw(url: str, calls: int, rate: float) -> BenchRow:
    nc = await nats.connect(url)
    js = nc.jetstream()
    prefix = f"lat{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=prefix.upper(), subjects=[f"{prefix}.>"]))
    payload = b"x" * PAYLOAD_BYTES

    async def publish(n: int) -> object:
        return await js.publish(f"{prefix}.{n % LATENCY_ENTITIES}", payload, timeout=30)

    try:
        return await paced(RAW_MODE, calls, rate, publish)
    finally:
        await js.delete_stream(prefix.upper())
        await nc.close()


async def _echo(target: str, calls: int, rate: float) -> BenchRow:
    body = b"x" * (PAYLOAD_BYTES + 64)
    async with grpc.aio.insecure_channel(target) as channel:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)

        async def call(_: int) -> object:
            return await echo(body, timeout=30)

        return await paced(ECHO_MODE, calls, rate, call)
