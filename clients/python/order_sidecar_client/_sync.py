"""The blocking client."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType

import grpc
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar_client._lease import Lease, release_request
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


class SidecarClient:
    """Talks to one sidecar (normally the one on localhost)."""

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
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self._metadata = token_metadata(token)
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)
        self.retry = retry or RetryPolicy()

    def publish(self, event: Event) -> Published:
        """Publish *event*, retrying transient failures with its idempotency key."""
        return self._publish_request(event.to_request())

    @contextlib.contextmanager
    def lease(
        self, entity_type: str, entity_id: str, *, ttl: float = 10.0, wait: float = 5.0
    ) -> Iterator[Lease]:
        """Hold the entity's lease for the block: renewed by a thread, then released.

        Raises SidecarError ABORTED when the entity stayed locked for *wait* seconds.
        """
        try:
            reply = self._stub.AcquireLease(
                acquire_request(entity_type, entity_id, ttl, wait),
                timeout=wait + self.retry.attempt_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error
        lease = Lease(self, LeaseInfo.from_reply(reply))
        lease._start()
        try:
            yield lease
        finally:
            lease.release()

    def _renew(self, lease_id: str) -> LeaseInfo:
        try:
            reply = self._stub.RenewLease(
                sidecar_pb2.RenewLeaseRequest(lease_id=lease_id),
                timeout=self.retry.attempt_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error
        return LeaseInfo.from_reply(reply)

    def _release(self, lease_id: str) -> None:
        try:
            self._stub.ReleaseLease(
                release_request(lease_id),
                timeout=self.retry.attempt_timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as rpc_error:
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error

    def _publish_request(self, request: sidecar_pb2.PublishRequest) -> Published:
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = self._stub.Publish(
                    request, timeout=self.retry.attempt_timeout, metadata=self._metadata
                )
                return Published.from_response(response)
            except grpc.RpcError as rpc_error:
                error = SidecarError.from_rpc_error(rpc_error)
                if not error.retryable or attempt == self.retry.attempts:
                    raise error from rpc_error
            time.sleep(self.retry.backoff(attempt))
        raise AssertionError("unreachable")

    def publish_batch(self, events: Sequence[Event]) -> list[BatchResult]:
        """Publish *events*; each entity's events keep their order. One result per event.

        Events that fail transiently are sent again (same keys, same order) until the
        policy's attempts run out; the last error is then their result.
        """
        results: list[BatchResult | None] = [None] * len(events)
        for attempt in range(1, self.retry.attempts + 1):
            todo = pending_indexes(events, results)
            if not todo:
                break
            request = sidecar_pb2.PublishBatchRequest(events=[events[i].to_request() for i in todo])
            try:
                response = self._stub.PublishBatch(
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
                time.sleep(self.retry.backoff(attempt))
        return finish_results(events, results)

    def publish_stream(self, events: Iterable[Event]) -> Iterator[tuple[Event, BatchResult]]:
        """Publish events over one PublishStream; yield (event, result) as each completes.

        What is queued goes out packed, many events per message; *events* is read ahead
        by at most a message's worth, as fast as the sidecar takes them. Failed events are
        not retried here: after a failure the stream refuses that entity's later events,
        so send the failed ones again, in order.
        """
        sent: dict[str, Event] = {}
        feed = _StreamFeed(events)

        def requests() -> Iterator[sidecar_pb2.PublishStreamRequest]:
            while batch := feed.take():
                sent.update((tag, event) for tag, event, _ in batch)  # before any reply
                yield stream_request(batch)
            if feed.error is not None:
                raise feed.error  # grpc cancels the call (and hides the error: kept in feed)

        call = self._stub.PublishStream(requests(), metadata=self._metadata)
        try:
            for response in call:
                for tag, result in stream_results(response):
                    yield sent.pop(tag), result
        except grpc.RpcError as rpc_error:
            if feed.error is not None:
                raise feed.error from None
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error
        finally:
            call.cancel()  # a no-op once the call is over; else the caller stopped reading
            feed.stop()
        if feed.error is not None:
            raise feed.error

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _StreamFeed:
    """The caller's events, read by a thread into a bounded queue and taken in packs.

    The queue holds at most one message's worth: once the sidecar stops reading (its
    window is full) and gRPC's flow control stops taking messages, the thread stops
    reading the caller's iterable (back-pressure)."""

    def __init__(self, events: Iterable[Event]) -> None:
        self._queue: queue.Queue[Queued | None] = queue.Queue(maxsize=PACK_EVENTS)
        self._stopped = threading.Event()
        self._carried: Queued | None = None
        self._ended = False
        self.error: Exception | None = None
        threading.Thread(
            target=self._fill, args=(events,), name="publish-stream-feed", daemon=True
        ).start()

    def _fill(self, events: Iterable[Event]) -> None:
        try:
            for number, event in enumerate(events, start=1):
                if self._stopped.is_set():
                    return
                self._queue.put(queued(number, event))
        except Exception as error:  # the caller's iterable broke: the caller gets it
            self.error = error
        if not self._stopped.is_set():
            self._queue.put(None)

    def take(self) -> list[Queued]:
        """The next message's events: waits for one, then takes those already queued
        (never waiting for more); empty once the events ended or the feed stopped."""
        first = self._carried or self._next(block=True)
        self._carried = None
        if first is None:
            return []
        batch, self._carried = pack(first, lambda: self._next(block=False))
        return batch

    def _next(self, *, block: bool) -> Queued | None:
        if self._ended:
            return None
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if item is None or self._stopped.is_set():
            self._ended = True
            return None
        return item

    def stop(self) -> None:
        """Stop reading the caller's events; wake a take() that waits for one."""
        self._stopped.set()
        # Emptying the queue unblocks the thread's put, after which it sees the flag; the
        # None then wakes gRPC's request thread if it waits in take().
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
