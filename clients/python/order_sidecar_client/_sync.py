"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

import grpc
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from ._types import (
    BatchResult,
    Event,
    Published,
    RetryPolicy,
    SidecarError,
    batch_results,
    pending_indexes,
)


class SidecarClient:
    """Talks to one sidecar (normally the one on localhost)."""

    def __init__(self, target: str = "127.0.0.1:50051", retry: RetryPolicy | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)
        self.retry = retry or RetryPolicy()

    def publish(self, event: Event) -> Published:
        """Publish *event*, retrying transient failures with its idempotency key."""
        request = event.to_request()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = self._stub.Publish(request, timeout=self.retry.attempt_timeout)
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
            todo = pending_indexes(results)
            if not todo:
                break
            request = sidecar_pb2.PublishBatchRequest(events=[events[i].to_request() for i in todo])
            try:
                response = self._stub.PublishBatch(request, timeout=self.retry.attempt_timeout)
                for index, result in zip(todo, batch_results(response, len(todo)), strict=True):
                    results[index] = result
            except grpc.RpcError as rpc_error:
                error = SidecarError.from_rpc_error(rpc_error)
                for index in todo:
                    results[index] = error
                if not error.retryable:
                    break
            if attempt < self.retry.attempts and pending_indexes(results):
                time.sleep(self.retry.backoff(attempt))
        return [r for r in results if r is not None]

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
