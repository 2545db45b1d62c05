"""PublishStream packing: many events per message in both directions, on real servers.

A counting proxy between client and sidecar records every message of the call, so the
tests see what went over the wire, not only what the client made of it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import grpc
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.jetstream.verify import OrderChecker
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import AsyncSidecarClient, Event, Published, SidecarClient
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import request, stream_messages

OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
REFUSED = grpc.StatusCode.FAILED_PRECONDITION.value[0]
ABORTED = grpc.StatusCode.ABORTED.value[0]
Feed = asyncio.Queue[sidecar_pb2.PublishStreamRequest | None]


class CountingProxy:
    """Forwards PublishStream to a sidecar and keeps each message's shape: whether it
    had the single field set, and how many packed items it carried."""

    def __init__(self, upstream: str) -> None:
        self.requests: list[tuple[bool, int]] = []
        self.responses: list[tuple[bool, int]] = []
        self._channel = grpc.aio.insecure_channel(upstream)
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)
        self._server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            self._forward,
            request_deserializer=sidecar_pb2.PublishStreamRequest.FromString,
            response_serializer=sidecar_pb2.PublishStreamResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "ordersidecar.v1.Sidecar", {"PublishStream": handler}
                ),
            )
        )
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    async def _forward(
        self, messages: AsyncIterator[sidecar_pb2.PublishStreamRequest], _: object
    ) -> AsyncIterator[sidecar_pb2.PublishStreamResponse]:
        async def upstream() -> AsyncIterator[sidecar_pb2.PublishStreamRequest]:
            async for message in messages:
                self.requests.append((message.HasField("event"), len(message.events)))
                yield message

        async for response in self._stub.PublishStream(upstream()):
            self.responses.append((response.HasField("result"), len(response.results)))
            yield response

    async def start(self) -> None:
        """Start serving."""
        await self._server.start()

    async def stop(self) -> None:
        """Stop serving and close the upstream channel."""
        await self._server.stop(None)
        await self._channel.close()

    def events_sent(self) -> int:
        """Events in all request messages."""
        return sum(int(single) + packed for single, packed in self.requests)

    def results_received(self) -> int:
        """Results in all response messages."""
        return sum(int(single) + packed for single, packed in self.responses)


@pytest.fixture
async def proxy(app: SidecarApp) -> AsyncIterator[CountingProxy]:
    """A counting proxy in front of the test's sidecar."""
    counting = CountingProxy(app.target)
    await counting.start()
    yield counting
    await counting.stop()


def assert_all_packed(proxy: CountingProxy, events: int) -> None:
    """Every message both ways packed-only, fewer messages than events, none lost."""
    assert all(not single and packed for single, packed in proxy.requests), proxy.requests
    assert all(not single and packed for single, packed in proxy.responses), proxy.responses
    assert proxy.events_sent() == events and proxy.results_received() == events
    assert max(packed for _, packed in proxy.requests) <= 256
    assert len(proxy.requests) < events // 10, proxy.requests
    assert len(proxy.responses) < events, len(proxy.responses)


def assert_sequences_follow_sending_order(
    events: list[Event], results: list[tuple[Event, Published]]
) -> None:
    """Each event answered once, and each entity's sequences in the order sent."""
    assert Counter(id(event) for event, _ in results) == Counter(id(event) for event in events)
    sequence_of = {id(event): result.sequence for event, result in results}
    for entity in {event.entity_id for event in events}:
        sent = [sequence_of[id(e)] for e in events if e.entity_id == entity]
        assert sent == list(range(1, len(sent) + 1)), entity


async def assert_stream_in_order(nc: NatsClient, stream: str, count: int) -> None:
    stored = await stream_messages(nc, stream)
    assert len(stored) == count
    checker = OrderChecker()
    for message in stored:
        checker.observe(message.headers)
    report = checker.report()
    assert report and all(counts.violations == 0 for counts in report.values()), report


def published(results: Iterable[tuple[Event, object]]) -> list[tuple[Event, Published]]:
    pairs = list(results)
    assert all(isinstance(result, Published) for _, result in pairs), pairs
    return [(event, result) for event, result in pairs if isinstance(result, Published)]


async def test_async_client_packs_a_stream_in_order_with_one_answer_per_event(
    app: SidecarApp, proxy: CountingProxy, nc: NatsClient
) -> None:
    events = [Event("order", f"p{n % 20}", "update", b"%d" % n) for n in range(2000)]
    async with AsyncSidecarClient(proxy.target) as client:
        results = published([pair async for pair in client.publish_stream(events)])
    assert_sequences_follow_sending_order(events, results)
    assert_all_packed(proxy, len(events))
    await assert_stream_in_order(nc, app.config.stream, len(events))


async def test_sync_client_packs_a_stream(
    app: SidecarApp, proxy: CountingProxy, nc: NatsClient
) -> None:
    events = [Event("order", f"q{n % 3}", "update") for n in range(600)]

    def run() -> list[tuple[Event, Published]]:
        # In a thread: the blocking client must not stall the in-process sidecar's loop.
        with SidecarClient(proxy.target) as client:
            return published(client.publish_stream(iter(events)))

    results = await asyncio.get_running_loop().run_in_executor(None, run)
    assert_sequences_follow_sending_order(events, results)
    assert_all_packed(proxy, len(events))
    await assert_stream_in_order(nc, app.config.stream, len(events))


async def test_sync_client_stops_reading_when_the_caller_stops(app: SidecarApp) -> None:
    def endless() -> Iterator[Event]:
        number = 0
        while True:
            number += 1
            yield Event("order", f"e{number % 5}", "update")

    def run() -> None:
        with SidecarClient(app.target) as client:
            for _, result in client.publish_stream(endless()):
                assert isinstance(result, Published)
                break  # closes the generator: the call is cancelled, the feed stops

    await asyncio.get_running_loop().run_in_executor(None, run)
    await _until(
        lambda: not any(t.name == "publish-stream-feed" for t in threading.enumerate()),
        10.0,
        "the feed thread to stop reading the endless events",
    )


async def test_sync_client_raises_what_the_callers_events_raised(app: SidecarApp) -> None:
    def broken() -> Iterator[Event]:
        yield Event("order", "g1", "create")
        raise RuntimeError("the caller's generator broke")

    def run() -> None:
        with SidecarClient(app.target) as client:
            for _ in client.publish_stream(broken()):
                pass

    with pytest.raises(RuntimeError, match="generator broke"):
        await asyncio.get_running_loop().run_in_executor(None, run)


async def test_an_old_style_stream_gets_single_responses(app: SidecarApp, nc: NatsClient) -> None:
    messages = [
        sidecar_pb2.PublishStreamRequest(tag=f"t{n}", event=request(f"old{n % 10}"))
        for n in range(200)
    ]
    messages.append(sidecar_pb2.PublishStreamRequest(tag="empty"))  # refused, as always
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        replies = [reply async for reply in stub.PublishStream(iter(messages), timeout=30)]
    assert all(reply.HasField("result") and not reply.results for reply in replies)
    assert sorted(reply.tag for reply in replies) == sorted(m.tag for m in messages)
    by_tag = {reply.tag: reply.result for reply in replies}
    assert by_tag.pop("empty").code == INVALID
    assert all(result.code == OK for result in by_tag.values())
    for entity in range(10):
        sequences = [by_tag[f"t{n}"].response.sequence for n in range(entity, 200, 10)]
        assert sequences == list(range(1, 21))
    await assert_stream_in_order(nc, app.config.stream, 200)


async def test_a_stream_is_answered_packed_once_it_sent_a_packed_message(
    app: SidecarApp,
) -> None:
    feed = Feed()
    async with grpc.aio.insecure_channel(app.target) as channel:
        call = sidecar_pb2_grpc.SidecarStub(channel).PublishStream(_drain(feed), timeout=30)
        feed.put_nowait(sidecar_pb2.PublishStreamRequest(tag="a1", event=request("a")))
        first = await call.read()
        assert isinstance(first, sidecar_pb2.PublishStreamResponse)
        assert (first.tag, first.result.response.sequence, len(first.results)) == ("a1", 1, 0)
        # Both forms in one message: the single event first, then the packed ones.
        both = sidecar_pb2.PublishStreamRequest(tag="a2", event=request("a"))
        both.events.add(tag="a3", event=request("a"))
        both.events.add(tag="b1", event=request("b"))
        feed.put_nowait(both)
        feed.put_nowait(sidecar_pb2.PublishStreamRequest(tag="a4", event=request("a")))
        feed.put_nowait(None)
        later = [reply async for reply in _replies(call)]
    assert all(not reply.HasField("result") and reply.results for reply in later), later
    results = {item.tag: item.result for reply in later for item in reply.results}
    assert {tag: r.response.sequence for tag, r in results.items()} == {
        "a2": 2,
        "a3": 3,
        "b1": 1,
        "a4": 4,
    }
    assert sum(len(reply.results) for reply in later) == 4


async def test_replies_that_complete_together_share_one_message(app: SidecarApp) -> None:
    # Invalid events are answered as they are read, all before the writer runs again.
    message = sidecar_pb2.PublishStreamRequest()
    for n in range(50):
        message.events.add(tag=f"bad{n}", event=request(f"bad id {n} "))  # trailing space
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        replies = [reply async for reply in stub.PublishStream(iter([message]), timeout=30)]
    assert len(replies) == 1
    assert sorted(item.tag for item in replies[0].results) == sorted(f"bad{n}" for n in range(50))
    assert {item.result.code for item in replies[0].results} == {INVALID}


async def test_an_invalid_event_in_a_packed_message_blocks_only_its_entity(
    app: SidecarApp, nc: NatsClient
) -> None:
    message = sidecar_pb2.PublishStreamRequest()
    for tag, entity, headers in [
        ("x1", "x", None),
        ("y1", "y", None),
        ("x2", "x", {"Nats-Foo": "bad"}),
        ("x3", "x", None),
        ("y2", "y", None),
    ]:
        message.events.add(tag=tag, event=request(entity, payload=tag.encode(), headers=headers))
    async with grpc.aio.insecure_channel(app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        replies = [reply async for reply in stub.PublishStream(iter([message]), timeout=30)]
    items = [item for reply in replies for item in reply.results]
    assert sorted(item.tag for item in items) == ["x1", "x2", "x3", "y1", "y2"]
    results = {item.tag: item.result for item in items}
    assert {tag: r.code for tag, r in results.items()} == {
        "x1": OK,
        "x2": INVALID,
        "x3": REFUSED,
        "y1": OK,
        "y2": OK,
    }
    assert "event 3 of this entity on this stream failed" in results["x3"].message
    assert [results["y1"].response.sequence, results["y2"].response.sequence] == [1, 2]
    stored = await stream_messages(nc, app.config.stream)
    assert sorted(m.payload for m in stored) == [b"x1", b"y1", b"y2"]


@pytest.fixture
async def narrow_app(serve_config: ServeConfig) -> AsyncIterator[SidecarApp]:
    """A sidecar with a 2-event stream window that waits 1 s for a held lock."""
    config = dataclasses.replace(serve_config, stream_window=2, lock_wait=1.0)
    sidecar = SidecarApp(config)
    await sidecar.start()
    yield sidecar
    await sidecar.stop()


async def test_the_window_counts_the_events_of_a_packed_message(narrow_app: SidecarApp) -> None:
    window = 2
    async with grpc.aio.insecure_channel(narrow_app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        # Leases on a and b keep the stream's first two events waiting for their locks
        # (then ABORTED): with a window of 2 events, c, d and e wait behind them.
        leases = [
            await stub.AcquireLease(
                sidecar_pb2.AcquireLeaseRequest(entity_type="patient", entity_id=entity),
                timeout=10,
            )
            for entity in ("a", "b")
        ]
        message = sidecar_pb2.PublishStreamRequest()
        for entity in "abcde":
            message.events.add(tag=entity, event=request(entity))
        replies = [reply async for reply in stub.PublishStream(iter([message]), timeout=30)]
        for lease in leases:
            await stub.ReleaseLease(sidecar_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id))
    order = [item.tag for reply in replies for item in reply.results]
    codes = {item.tag: item.result.code for reply in replies for item in reply.results}
    assert sorted(order) == list("abcde")
    assert codes == {"a": ABORTED, "b": ABORTED, "c": OK, "d": OK, "e": OK}
    # The k-th event is read only once k - window earlier replies went out.
    for number, tag in enumerate("abcde", start=1):
        assert order.index(tag) >= number - window, order


async def _drain(feed: Feed) -> AsyncIterator[sidecar_pb2.PublishStreamRequest]:
    while (item := await feed.get()) is not None:
        yield item


async def _replies(
    call: grpc.aio.StreamStreamCall[
        sidecar_pb2.PublishStreamRequest, sidecar_pb2.PublishStreamResponse
    ],
) -> AsyncIterator[sidecar_pb2.PublishStreamResponse]:
    """The rest of a call's replies, read with read() (gRPC forbids mixing it with async for)."""
    while isinstance(reply := await call.read(), sidecar_pb2.PublishStreamResponse):
        yield reply


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll *condition* (without blocking the loop) until true, or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
