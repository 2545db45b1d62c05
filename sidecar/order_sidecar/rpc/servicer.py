"""The gRPC servicer: requests in, the core's Publisher and lease registry, replies out.

Errors become statuses only through ``order_sidecar.rpc.status``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from order_sidecar_client import contract
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar.core.errors import (
    InvalidEvent,
    LimitExceeded,
    ShuttingDown,
    SidecarError,
    internal_error,
)
from order_sidecar.core.model import Event
from order_sidecar.core.publisher import Publisher
from order_sidecar.rpc.batches import BatchOutcome, group_by_entity, reply_of, result_of
from order_sidecar.rpc.convert import event_from_request
from order_sidecar.rpc.leases import lease_reply, lease_terms
from order_sidecar.rpc.status import abort_rpc, grpc_status
from order_sidecar.telemetry.metrics import Metrics, outcome_of

log = logging.getLogger(__name__)

ReplyT = TypeVar("ReplyT")


class SidecarService(sidecar_pb2_grpc.SidecarServicer):
    """Implements ordersidecar.v1.Sidecar on top of a Publisher."""

    def __init__(
        self,
        publisher: Publisher,
        max_batch: int,
        max_inflight_entities: int,
        default_lease_ttl: float,
        stream_window: int,
        metrics: Metrics,
        describe: Callable[[], sidecar_pb2.SidecarStatus] = sidecar_pb2.SidecarStatus,
        *,
        max_streams: int = 64,
    ) -> None:
        self._max_streams = max_streams
        self._streams = 0
        self._describe = describe
        self._recent_errors: collections.deque[sidecar_pb2.RecentError] = collections.deque(
            maxlen=RECENT_ERRORS
        )
        self._publisher = publisher
        self._metrics = metrics
        self._stream_window = stream_window
        self._default_lease_ttl = default_lease_ttl
        self._max_batch = max_batch
        self._max_inflight_entities = max_inflight_entities
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    async def drain(self, grace: float) -> int:
        """Refuse new RPCs; wait up to *grace* seconds for those in flight. Returns how many
        are still running (grpc's own stop would cancel them at once)."""
        self._draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        return self._in_flight

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        if self._draining:
            raise ShuttingDown("sidecar is shutting down; retry (on another replica)")
        self._in_flight += 1
        self._metrics.in_flight.inc()
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            self._metrics.in_flight.dec()
            if self._in_flight == 0:
                self._idle.set()

    async def _answer(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[], Awaitable[ReplyT]],
        entity_type: str = "",
    ) -> ReplyT:
        """Run *work* as one tracked, timed RPC; any error becomes the RPC's status, here only."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            with self._tracked():
                return await work()
        except Exception as error:
            outcome = outcome_of(error)
            if rpc == "Publish":
                self._metrics.publish_results.labels(outcome).inc()
            self._failed(rpc, error, entity_type, started)
            await abort_rpc(context, error)
        finally:
            self._metrics.rpc_seconds.labels(rpc, outcome).observe(time.perf_counter() - started)

    async def Publish(
        self,
        request: sidecar_pb2.PublishRequest,
        context: grpc.aio.ServicerContext[sidecar_pb2.PublishRequest, sidecar_pb2.PublishResponse],
    ) -> sidecar_pb2.PublishResponse:
        """Publish one event in its entity's order."""

        async def work() -> sidecar_pb2.PublishResponse:
            event = event_from_request(request)
            stored = await self._publisher.publish(event, context.time_remaining())
            self._metrics.count_result(stored)
            return reply_of(stored)

        return await self._answer("Publish", context, work, request.entity_type)

    async def PublishBatch(
        self,
        request: sidecar_pb2.PublishBatchRequest,
        context: grpc.aio.ServicerContext[
            sidecar_pb2.PublishBatchRequest, sidecar_pb2.PublishBatchResponse
        ],
    ) -> sidecar_pb2.PublishBatchResponse:
        """Publish many events; one result per event, in request order."""

        async def work() -> sidecar_pb2.PublishBatchResponse:
            if len(request.events) > self._max_batch:
                raise InvalidEvent(
                    f"batch of {len(request.events)} events is over the limit of "
                    f"{self._max_batch} (--max-batch); split it"
                )
            started = time.perf_counter()
            outcomes = await self._publish_batch(request, context.time_remaining())
            for event, item in zip(request.events, outcomes, strict=True):
                self._metrics.count_result(item)
                if isinstance(item, SidecarError):
                    self._failed("PublishBatch", item, event.entity_type, started)
            return sidecar_pb2.PublishBatchResponse(results=[result_of(item) for item in outcomes])

        return await self._answer("PublishBatch", context, work)

    async def PublishStream(
        self,
        requests: AsyncIterator[sidecar_pb2.PublishStreamRequest],
        context: grpc.aio.ServicerContext[
            sidecar_pb2.PublishStreamRequest, sidecar_pb2.PublishStreamResponse
        ],
    ) -> AsyncIterator[sidecar_pb2.PublishStreamResponse]:
        """Publish a stream of tagged events; tagged results as each completes."""
        # Unbounded, because the window bounds it: a slot is taken when an event is read
        # and given back once its reply is handed to gRPC, whose flow control then bounds
        # what waits for a slow reader.
        replies: asyncio.Queue[TaggedOutcome | None] = asyncio.Queue()
        window = asyncio.Semaphore(self._stream_window)
        if self._streams >= self._max_streams:
            refused = LimitExceeded(
                f"{self._streams} PublishStream calls are open, the limit (--max-streams); "
                "retry later, share one stream, or use PublishBatch"
            )
            self._failed("PublishStream", refused, "", time.perf_counter())
            await abort_rpc(context, refused)
        self._streams += 1
        packed = _StreamForm()
        reader = asyncio.create_task(self._read_stream(requests, replies, window, packed))
        try:
            ended = False
            while not ended:
                ready, ended = await _ready_replies(replies, packed)
                if ready:
                    yield _stream_response(ready, packed.seen)
                    for _ in ready:
                        window.release()
            await reader  # re-raises what stopped the reading, if anything
        except Exception as error:
            await abort_rpc(context, error)
        finally:
            self._streams -= 1
            reader.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[sidecar_pb2.PublishStreamRequest],
        replies: asyncio.Queue[TaggedOutcome | None],
        window: asyncio.Semaphore,
        packed: _StreamForm,
    ) -> None:
        failed: dict[str, tuple[int, SidecarError]] = {}
        running: set[asyncio.Task[None]] = set()

        def answer(tag: str, outcome: BatchOutcome) -> None:
            self._metrics.count_result(outcome)
            replies.put_nowait((tag, result_of(outcome)))

        async def publish(index: int, tag: str, event: Event) -> None:
            started = time.perf_counter()
            try:
                outcome: BatchOutcome = await self._publisher.publish_streamed(event, index, failed)
            except Exception as error:  # every event gets exactly one answer
                outcome = internal_error(error)
                self._failed("PublishStream", outcome, event.entity_type, started)
            answer(tag, outcome)

        def take(index: int, tag: str, request: sidecar_pb2.PublishRequest) -> None:
            try:
                event = event_from_request(request)
            except SidecarError as error:
                entity = (request.entity_type, request.entity_id)
                failed.setdefault(self._publisher.lock_key_of(*entity), (index, error))
                self._failed("PublishStream", error, entity[0], time.perf_counter())
                answer(tag, error)
                return
            task = asyncio.create_task(publish(index, tag, event))
            running.add(task)
            task.add_done_callback(running.discard)

        try:
            with self._tracked():
                try:
                    index = 0
                    async for message in requests:
                        # Set before any of its events is answered: their replies go packed.
                        packed.seen = packed.seen or bool(message.events)
                        for tag, request in _events_of(message):
                            await window.acquire()  # the window counts events, not messages
                            index += 1
                            take(index, tag, request)
                    await asyncio.gather(*running)
                finally:
                    # The stream ended abnormally (client gone, shutdown): stop its publishes
                    # while they still count as in flight, rather than behind the drain.
                    for task in running:
                        task.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
        finally:
            replies.put_nowait(None)

    async def GetStatus(
        self,
        request: sidecar_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[sidecar_pb2.GetStatusRequest, sidecar_pb2.SidecarStatus],
    ) -> sidecar_pb2.SidecarStatus:
        """The sidecar's state for operators."""
        status = self._describe()
        status.requests_in_flight = self._in_flight
        status.last_errors.extend(reversed(self._recent_errors))
        return status

    def _failed(self, rpc: str, error: BaseException, entity_type: str, started: float) -> None:
        safe_type = entity_type if contract.is_entity_type(entity_type) else "(invalid)"
        _log_failure(rpc, error, safe_type, started)
        code, message = grpc_status(error)
        recent = sidecar_pb2.RecentError(
            rpc=rpc, code=code.name, entity_type=safe_type, message=message
        )
        recent.at.GetCurrentTime()
        self._recent_errors.append(recent)

    async def AcquireLease(
        self,
        request: sidecar_pb2.AcquireLeaseRequest,
        context: grpc.aio.ServicerContext[sidecar_pb2.AcquireLeaseRequest, sidecar_pb2.Lease],
    ) -> sidecar_pb2.Lease:
        """Take an entity's lock for the caller."""

        async def work() -> sidecar_pb2.Lease:
            ttl, wait = lease_terms(request, self._default_lease_ttl, context.time_remaining())
            subject = self._publisher.stream.subject_of(request.entity_type, request.entity_id)
            return lease_reply(
                await self._publisher.leases.acquire(
                    request.entity_type, request.entity_id, subject, ttl, wait
                )
            )

        return await self._answer("AcquireLease", context, work, request.entity_type)

    async def RenewLease(
        self,
        request: sidecar_pb2.RenewLeaseRequest,
        context: grpc.aio.ServicerContext[sidecar_pb2.RenewLeaseRequest, sidecar_pb2.Lease],
    ) -> sidecar_pb2.Lease:
        """Extend a lease by its TTL."""

        async def work() -> sidecar_pb2.Lease:
            return lease_reply(await self._publisher.leases.renew(request.lease_id))

        return await self._answer("RenewLease", context, work)

    async def ReleaseLease(
        self,
        request: sidecar_pb2.ReleaseLeaseRequest,
        context: grpc.aio.ServicerContext[
            sidecar_pb2.ReleaseLeaseRequest, sidecar_pb2.ReleaseLeaseResponse
        ],
    ) -> sidecar_pb2.ReleaseLeaseResponse:
        """Give a lease up."""

        async def work() -> sidecar_pb2.ReleaseLeaseResponse:
            await self._publisher.leases.release(request.lease_id)
            return sidecar_pb2.ReleaseLeaseResponse()

        return await self._answer("ReleaseLease", context, work)

    async def _publish_batch(
        self, request: sidecar_pb2.PublishBatchRequest, budget: float | None
    ) -> list[BatchOutcome]:
        outcomes: list[BatchOutcome | None] = [None] * len(request.events)
        entities = group_by_entity(request.events, outcomes)
        groups = iter(entities)

        async def worker() -> None:
            # A few workers take the entities in turn: a batch of 1,000 entities costs
            # --max-inflight-entities tasks, not 1,000 (memory and scheduling).
            for indexes, events in groups:
                try:
                    results = await self._publisher.publish_in_order(events, budget)
                except Exception as error:  # the other groups go on; this one reports it
                    log.exception("unexpected error in a batch", exc_info=error)
                    results = [internal_error(error)] * len(events)
                for index, result in zip(indexes, results, strict=True):
                    outcomes[index] = result

        workers = min(len(entities), self._max_inflight_entities)
        await asyncio.gather(*(worker() for _ in range(workers)))
        missing = [index for index, item in enumerate(outcomes) if item is None]
        if missing:
            raise AssertionError(f"batch events without an outcome: {missing}")
        return [item for item in outcomes if item is not None]


RECENT_ERRORS = 10
# Bounds of one packed PublishStreamResponse: far below gRPC's 4 MiB default receive
# limit, and a reader that falls behind gets results in a few large messages.
PACKED_RESULTS = 256
PACKED_RESULT_BYTES = 1024 * 1024

TaggedOutcome = tuple[str, sidecar_pb2.PublishResult]


class _StreamForm:
    """Whether a stream has sent a packed request, after which its replies go packed."""

    def __init__(self) -> None:
        self.seen = False


def _events_of(
    message: sidecar_pb2.PublishStreamRequest,
) -> Iterator[tuple[str, sidecar_pb2.PublishRequest]]:
    """A stream message's events in order: the single one first, then the packed ones.

    A message without any is an old-style message with an empty event, which is refused
    as before, so that every message of an old client still gets its answer."""
    if message.HasField("event") or not message.events:
        yield message.tag, message.event
    for tagged in message.events:
        yield tagged.tag, tagged.event


async def _ready_replies(
    replies: asyncio.Queue[TaggedOutcome | None], form: _StreamForm
) -> tuple[list[TaggedOutcome], bool]:
    """Wait for one reply, then (on a packed stream) take those already waiting too, up
    to the bounds of a packed response, never waiting for more; and whether the reading
    has ended."""
    first = await replies.get()
    if first is None:
        return [], True
    ready, size = [first], first[1].ByteSize()
    while form.seen and len(ready) < PACKED_RESULTS and size < PACKED_RESULT_BYTES:
        try:
            item = replies.get_nowait()
        except asyncio.QueueEmpty:
            break
        if item is None:
            return ready, True
        ready.append(item)
        size += item[1].ByteSize()
    return ready, False


def _stream_response(ready: list[TaggedOutcome], packed: bool) -> sidecar_pb2.PublishStreamResponse:
    """One response message: packed results, or (before any packed request) one result."""
    if packed:
        return sidecar_pb2.PublishStreamResponse(
            results=[sidecar_pb2.TaggedResult(tag=tag, result=result) for tag, result in ready]
        )
    ((tag, result),) = ready
    return sidecar_pb2.PublishStreamResponse(tag=tag, result=result)


def _log_failure(rpc: str, error: BaseException, entity_type: str, started: float) -> None:
    """One line per failed publish or lease call: what, why, how long; never the payload."""
    code, message = grpc_status(error)
    fields = {
        "rpc": rpc,
        "code": code.name,
        "entity_type": entity_type,
        "reason": type(error).__name__,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if isinstance(error, SidecarError):
        log.info("%s failed: %s", rpc, message, extra=fields)
    else:
        log.error("%s failed unexpectedly", rpc, exc_info=error, extra=fields)
