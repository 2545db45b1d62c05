"""The blocking client."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType

import grpc
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar_client._lease import Lease, release_request
from order_sidecar_client._types import (
    BatchResult,
    Event,
    LeaseInfo,
    Published,
    RetryPolicy,
    SidecarError,
    acquire_request,
    batch_results,
    stream_result,
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

        Failed events are not retried here: after a failure the stream refuses that
        entity's later events, so send the failed ones again, in order.
        """
        sent: dict[str, Event] = {}
        broken: list[BaseException] = []  # grpc hides errors raised while reading requests

        def requests() -> Iterator[sidecar_pb2.PublishStreamRequest]:
            try:
                for number, event in enumerate(events, start=1):
                    request = event.to_request()
                    sent[str(number)] = event
                    yield sidecar_pb2.PublishStreamRequest(tag=str(number), event=request)
            except Exception as error:
                broken.append(error)
                raise

        try:
            for response in self._stub.PublishStream(requests(), metadata=self._metadata):
                yield sent.pop(response.tag), stream_result(response)
        except grpc.RpcError as rpc_error:
            if broken:
                raise broken[0] from None
            raise SidecarError.from_rpc_error(rpc_error) from rpc_error
        if broken:
            raise broken[0]

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
