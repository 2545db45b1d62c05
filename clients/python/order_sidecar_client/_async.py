"""The asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType

import grpc
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar_client._lease import AsyncLease, release_request
from order_sidecar_client._types import (
    PACK_EVENTS,
    BatchResult,
    Event,
    LeaseInfo,
    Published,
    Queued,
    RetryPolicy,
    SidecarError,
    acquire_request,
    batch_results,
    pack,
    queued,
    stream_request,
    stream_results,
)
from order_sidecar_client.channel import PathLike, tls_credentials, token_metadata
from order_sidecar_client.retries import finish_results, pending_indexes


async def _numbered(
    events: AsyncIterable[Event] | Iterable[Event],
) -> AsyncIterator[tuple[int, Event]]:
    number = 0
    if isinstance(events, AsyncIterable):
        async for event in events:
            number += 1
            yield number, event
    else:
        for event in events:
            number += 1
            yield number, event


class _StreamFeed:
    """The caller's events, read by a task into a bounded queue and taken in packs.

    The queue holds at most one message's worth: once the sidecar stops reading (its
    window is full) and gRPC's flow control stops taking messages, the task stops reading
    the caller's events (back-pressure)."""

    def __init__(self, events: AsyncIterable[Event] | Iterable[Event]) -> None:
        self._queue: asyncio.Queue[Queued | None] = asyncio.Queue(maxsize=PACK_EVENTS)
        self._carried: Queued | None = None
        self._ended = False
        self.error: Exception | None = None
        self._filler = asyncio.ensure_future(self._fill(events))

    async def _fill(self, events: AsyncIterable[Event] | Iterable[Event]) -> None:
        try:
            async for number, event in _numbered(events):
                await self._queue.put(queued(number, event))
        except Exception as error:  # the caller's events broke: the caller gets it
            self.error = error
        await self._queue.put(None)

    async def take(self) -> list[Queued]:
        """The next message's events: waits for one, then takes those already queued
        (never waiting for more); empty once the events ended."""
        first = self._carried
        self._carried = None
        if first is None and not self._ended:
            first = await self._queue.get()
            self._ended = first is None
        if first is None:
            return []
        batch, self._carried = pack(first, self._ready)
        return batch

    def _ready(self) -> Queued | None:
        if self._ended:
            return None
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        self._ended = item is None
        return item

    def stop(self) -> None:
        """Stop reading the caller's events."""
        self._filler.cancel()


class AsyncSidecarClient:
    """Talks to one sidecar from asyncio code."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        retry: RetryPolicy | None = None,
        *,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        token: str | None = None,
    ) -> None:
        """Connect to the sidecar at *target*.

        TLS is on with *tls* or any ``tls_*`` file: *tls_ca* verifies the sidecar (system
        CAs when unset), *tls_cert*/*tls_key* answer a sidecar that requires mutual TLS.
        *token* is sent with every call, for a sidecar with --auth-token-file.
        """
        credentials = tls_credentials(tls, tls_ca, tls_cert, tls_key)
        self._channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials
            else grpc.aio.insecure_channel(target)
        )
        self._metadata = token_metadata(token)
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)
        self.retry = retry or RetryPolicy()

    async def publish(self, event: Event) -> Published:
        """Publish *event*, retrying transient failures with its idempotency key."""
        return await self._publish_request(event.to_request())

    @contextlib.asynccontextmanager
    async def lease(
        self, entity_type: str, entity_id: str, *, ttl: float = 10.0, wait: float = 5.0
    ) -> AsyncIterator[AsyncLease]:
        """Hold the entity's lease for the block: renewed in the background, then released.

        Raises SidecarError ABORTED when the entity stayed locked for *wait* seconds.
        """
        try:
            reply = await self._stub.AcquireLease(
                acquire_request(entity_type, entity_id, ttl, wait),
                timeout=wait + self.retry.attempt_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error
        lease = AsyncLease(self, LeaseInfo.from_reply(reply))
        renewer = asyncio.ensure_future(lease._keep_renewed())
        try:
            yield lease
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await lease.release()

    async def _renew(self, lease_id: str) -> LeaseInfo:
        try:
            reply = await self._stub.RenewLease(
                sidecar_pb2.RenewLeaseRequest(lease_id=lease_id),
                timeout=self.retry.attempt_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error
        return LeaseInfo.from_reply(reply)

    async def _release(self, lease_id: str) -> None:
        try:
            await self._stub.ReleaseLease(
                release_request(lease_id),
                timeout=self.retry.attempt_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error

    async def _publish_request(self, request: sidecar_pb2.PublishRequest) -> Published:
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = await self._stub.Publish(
                    request, timeout=self.retry.attempt_timeout, metadata=self._metadata
                )
                return Published.from_response(response)
            except grpc.RpcError as rpc_error:
                error = SidecarError.from_rpc_error(rpc_error)
                if not error.retryable or attempt == self.retry.attempts:
                    raise error from rpc_error
            await asyncio.sleep(self.retry.backoff(attempt))
        raise AssertionError("unreachable")

    async def publish_batch(self, events: Sequence[Event]) -> list[BatchResult]:
        """Publish *events*; each entity's events keep their order. One result per event."""
        results: list[BatchResult | None] = [None] * len(events)
        for attempt in range(1, self.retry.attempts + 1):
            todo = pending_indexes(events, results)
            if not todo:
                break
            request = sidecar_pb2.PublishBatchRequest(events=[events[i].to_request() for i in todo])
            try:
                response = await self._stub.PublishBatch(
                    request, timeout=self.retry.attempt_timeout, metadata=self._metadata
                )
                for index, result in zip(todo, batch_results(response, len(todo)), strict=True):
                    results[index] = result
            except grpc.RpcError as rpc_error:
                error = SidecarError.from_rpc_error(rpc_error)
                for index in todo:
                    results[index] = error
                if not error.retryable:
                    break
            if attempt < self.retry.attempts and pending_indexes(events, results):
                await asyncio.sleep(self.retry.backoff(attempt))
        return finish_results(events, results)

    async def publish_stream(
        self, events: AsyncIterable[Event] | Iterable[Event]
    ) -> AsyncIterator[tuple[Event, BatchResult]]:
        """Publish events over one PublishStream; yield (event, result) as each completes.

        What is queued goes out packed, many events per message; *events* is read ahead
        by at most a message's worth, as fast as the sidecar takes them. Failed events
        are not retried here: after a failure the stream refuses that entity's later
        events, so send the failed ones again, in order (their keys make that safe).
        """
        sent: dict[str, Event] = {}
        feed = _StreamFeed(events)

        async def requests() -> AsyncIterator[sidecar_pb2.PublishStreamRequest]:
            while batch := await feed.take():
                sent.update((tag, event) for tag, event, _ in batch)  # before any reply
                yield stream_request(batch)
            if feed.error is not None:
                # grpc swallows an error raised while it reads our requests (and cancels
                # the call); the feed keeps it so that the caller sees it, not a bare
                # cancellation.
                raise feed.error

        call = self._stub.PublishStream(requests(), metadata=self._metadata)
        try:
            async for response in call:
                for tag, result in stream_results(response):
                    yield sent.pop(tag), result
        except (grpc.RpcError, asyncio.CancelledError) as stopped:
            if feed.error is not None:
                raise feed.error from None
            if isinstance(stopped, asyncio.CancelledError):
                raise
            raise SidecarError.from_rpc_error(stopped) from stopped
        finally:
            call.cancel()  # a no-op once the call is over; else the caller stopped reading
            feed.stop()
        if feed.error is not None:
            raise feed.error

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
