"""The asyncio client."""

from __future__ import annotations

import asyncio
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


class AsyncSidecarClient:
    """Talks to one sidecar from asyncio code."""

    def __init__(self, target: str = "127.0.0.1:50051", retry: RetryPolicy | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)
        self.retry = retry or RetryPolicy()

    async def publish(self, event: Event) -> Published:
        """Publish *event*, retrying transient failures with its idempotency key."""
        request = event.to_request()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = await self._stub.Publish(request, timeout=self.retry.attempt_timeout)
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
            todo = pending_indexes(results)
            if not todo:
                break
            request = sidecar_pb2.PublishBatchRequest(events=[events[i].to_request() for i in todo])
            try:
                response = await self._stub.PublishBatch(
                    request, timeout=self.retry.attempt_timeout
                )
                for index, result in zip(todo, batch_results(response, len(todo)), strict=True):
                    results[index] = result
            except grpc.RpcError as rpc_error:
                error = SidecarError.from_rpc_error(rpc_error)
                for index in todo:
                    results[index] = error
                if not error.retryable:
                    break
            if attempt < self.retry.attempts and pending_indexes(results):
                await asyncio.sleep(self.retry.backoff(attempt))
        return [r for r in results if r is not None]

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
