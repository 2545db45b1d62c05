"""Property-based: arbitrary strings, sizes and header maps at every RPC.

Every answer is OK or a clear status with a message (never UNKNOWN or INTERNAL), the
sidecar still answers health checks, and the stream holds exactly the OK events, each
entity's in order without gaps: nothing rejected or half-published lands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from order_sidecar.jetstream.verify import verify_stream
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import stream_messages
from tests.support.servers import NatsServer

CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
}
MAX_BATCH = 6
CODES = {code.value[0]: code for code in grpc.StatusCode}

texts = st.text(max_size=40) | st.text(st.characters(codec="utf-8"), max_size=300)
entity_types = st.sampled_from(["patient", "order"]) | texts
entity_ids = st.sampled_from(["1", "2", "3"]) | texts | st.just("x" * 257)
header_names = st.sampled_from(["X-Ok", "Nats-Msg-Id", "Entity-Sequence", "a b"]) | texts
headers = st.dictionaries(header_names, texts | st.just("v\r\nX: y"), max_size=4)
payload_sizes = st.integers(0, 200) | st.sampled_from([1024 * 1024, 4 * 1024 * 1024 + 1])
sane_events = st.fixed_dictionaries(
    {
        "entity_type": st.sampled_from(["patient", "order"]),
        "entity_id": st.sampled_from(["1", "2", "3", "ü 4"]),
        "operation": st.integers(1, 3),
        "size": st.integers(0, 100),
        "headers": st.just({}) | st.just({"X-Trace": "t1"}),
        "idempotency_key": st.just(""),
        "expected_sequence": st.none(),
        "entity_version": st.none(),
        "lease_id": st.just(""),
    }
)
wild_events = st.fixed_dictionaries(
    {
        "entity_type": entity_types,
        "entity_id": entity_ids,
        "operation": st.integers(-1, 5),
        "size": payload_sizes,
        "headers": headers,
        "idempotency_key": st.just("") | texts,
        "expected_sequence": st.none() | st.integers(0, 4),
        "entity_version": st.none() | st.integers(0, 2**63 - 1),
        "lease_id": st.just("") | texts,
    }
)
# Half the events are valid, so that OK replies, order and rejections interleave.
events = sane_events | wild_events
calls = st.tuples(
    st.sampled_from(["Publish", "PublishBatch", "PublishStream", "Lease", "Renew", "Status"]),
    st.lists(events, min_size=0, max_size=MAX_BATCH + 2),
)


@dataclasses.dataclass
class Ledger:
    """What the sidecar answered: OK events (by payload marker), rejected ones, and those
    of a stream that ended before answering them (outcome unknown, as after a cut
    connection: the client resends them with their keys)."""

    count: int = 0
    ok: set[bytes] = dataclasses.field(default_factory=set)
    rejected: set[bytes] = dataclasses.field(default_factory=set)
    unknown: set[bytes] = dataclasses.field(default_factory=set)

    def request(self, drawn: dict[str, Any]) -> sidecar_pb2.PublishRequest:
        self.count += 1
        marker = f"fz{self.count}:".encode()
        request = sidecar_pb2.PublishRequest(
            entity_type=drawn["entity_type"],
            entity_id=drawn["entity_id"],
            operation=drawn["operation"],
            payload=marker + b"x" * drawn["size"],
            headers=drawn["headers"],
            idempotency_key=drawn["idempotency_key"],
            lease_id=drawn["lease_id"],
        )
        for name in ("expected_sequence", "entity_version"):
            if drawn[name] is not None:
                setattr(request, name, drawn[name])
        return request

    def answer(self, request: sidecar_pb2.PublishRequest, code: grpc.StatusCode | None) -> None:
        """Record *request*'s outcome; None: unknown."""
        marker = request.payload.split(b":", 1)[0] + b":"
        if code is None:
            self.unknown.add(marker)
        else:
            (self.ok if code == grpc.StatusCode.OK else self.rejected).add(marker)


@pytest.fixture
def sidecar(serve_config: ServeConfig) -> Iterator[SidecarApp]:
    """A sidecar on its own event loop thread, so that hypothesis can drive it synchronously."""
    config = dataclasses.replace(serve_config, max_batch=MAX_BATCH, lock_wait=0.5)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = SidecarApp(config)
    asyncio.run_coroutine_threadsafe(app.start(), loop).result(30)
    yield app
    asyncio.run_coroutine_threadsafe(app.stop(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def check(error: grpc.RpcError) -> grpc.StatusCode:
    """The call's code, after checking it is a clear one with a message."""
    code = error.code()
    assert code in CLEAR, (code, error.details())
    assert error.details(), code
    return code


def result_code(result: sidecar_pb2.PublishResult) -> grpc.StatusCode:
    code = CODES[result.code]
    assert code in CLEAR, (code, result.message)
    assert code == grpc.StatusCode.OK or result.message
    return code


def run_call(
    stub: sidecar_pb2_grpc.SidecarStub, ledger: Ledger, rpc: str, drawn: list[dict[str, Any]]
) -> None:
    """One RPC with the drawn events; record every event's fate in *ledger*."""
    requests = [ledger.request(item) for item in drawn]
    try:
        if rpc == "Publish" and requests:
            stub.Publish(requests[0], timeout=20)
            ledger.answer(requests[0], grpc.StatusCode.OK)
        elif rpc == "PublishBatch":
            batch = sidecar_pb2.PublishBatchRequest(events=requests)
            reply = stub.PublishBatch(batch, timeout=20)
            assert len(reply.results) == len(requests)
            for request, result in zip(requests, reply.results, strict=True):
                ledger.answer(request, result_code(result))
        elif rpc == "PublishStream":
            publish_stream(stub, ledger, requests)
        else:
            lease_calls(stub, rpc, drawn[0] if drawn else {"entity_type": "", "entity_id": ""})
    except grpc.RpcError as error:
        code = check(error)
        for request in requests if rpc != "Publish" else requests[:1]:
            ledger.answer(request, code)


def publish_stream(
    stub: sidecar_pb2_grpc.SidecarStub, ledger: Ledger, requests: list[sidecar_pb2.PublishRequest]
) -> None:
    """One stream: each event answered once; if the stream itself fails (e.g. an event
    over --max-message-bytes ends it), unanswered events have an unknown outcome."""
    tagged = [sidecar_pb2.PublishStreamRequest(tag=str(i), event=r) for i, r in enumerate(requests)]
    answered: list[int] = []
    try:
        for reply in stub.PublishStream(iter(tagged), timeout=20):
            answered.append(int(reply.tag))
            ledger.answer(requests[int(reply.tag)], result_code(reply.result))
    except grpc.RpcError as error:
        check(error)
        for index, request in enumerate(requests):
            if index not in answered:
                ledger.answer(request, None)
        return
    assert sorted(answered) == list(range(len(requests))), "every event answered once"


def lease_calls(stub: sidecar_pb2_grpc.SidecarStub, rpc: str, drawn: dict[str, Any]) -> None:
    """AcquireLease then release it; RenewLease/ReleaseLease of a made-up id; GetStatus."""
    if rpc == "Status":
        stub.GetStatus(sidecar_pb2.GetStatusRequest(), timeout=20)
    elif rpc == "Renew":
        lease_id = drawn.get("lease_id", "")
        for call in (
            lambda: stub.RenewLease(sidecar_pb2.RenewLeaseRequest(lease_id=lease_id), timeout=20),
            lambda: stub.ReleaseLease(
                sidecar_pb2.ReleaseLeaseRequest(lease_id=lease_id), timeout=20
            ),
        ):
            try:
                call()
            except grpc.RpcError as error:
                check(error)
    else:
        lease = stub.AcquireLease(
            sidecar_pb2.AcquireLeaseRequest(
                entity_type=drawn["entity_type"], entity_id=drawn["entity_id"]
            ),
            timeout=20,
        )
        stub.ReleaseLease(sidecar_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=20)


def test_any_input_gets_a_clear_answer_and_the_stream_stays_in_order(
    sidecar: SidecarApp, nats_server: NatsServer
) -> None:
    ledger = Ledger()
    channel = grpc.insecure_channel(sidecar.target)
    stub = sidecar_pb2_grpc.SidecarStub(channel)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.lists(calls, min_size=1, max_size=4))
    def run(drawn_calls: list[tuple[str, list[dict[str, Any]]]]) -> None:
        for rpc, drawn in drawn_calls:
            run_call(stub, ledger, rpc, drawn)

    try:
        run()
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
    asyncio.run(check_stream(nats_server.url, sidecar.config.stream, ledger))


async def check_stream(url: str, stream: str, ledger: Ledger) -> None:
    """The stream holds exactly the OK events, once each, every entity in order."""
    nc = await nats.connect(url)
    try:
        stored = [m.payload.split(b":", 1)[0] + b":" for m in await stream_messages(nc, stream)]
        reports = await verify_stream(nc, stream)
    finally:
        await nc.close()
    assert len(stored) == len(set(stored)), "an event landed twice"
    assert ledger.ok <= set(stored), "an OK event is missing"
    assert set(stored) <= ledger.ok | ledger.unknown, "an event landed that was not OK"
    assert not set(stored) & ledger.rejected, "a rejected event landed"
    assert ledger.ok and ledger.rejected, "the run exercised both outcomes"
    assert not any(report.violations for report in reports.values()), reports
