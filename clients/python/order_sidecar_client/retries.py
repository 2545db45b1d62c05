"""Which events of a batch to send again, and their final results after the retries.

Public so that other clients can follow (and tests can check) the same rule: an entity's
events behind one that failed for good are never resent on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from order_sidecar_client._types import BatchResult, Event, Published, SidecarError


def pending_indexes(events: Sequence[Event], results: list[BatchResult | None]) -> list[int]:
    """Events still to send: never answered, or answered with a retryable error, and not
    behind an event of the same entity that failed for good (that would skip it)."""
    pending = []
    stopped: set[tuple[str, str]] = set()
    for index, (event, result) in enumerate(zip(events, results, strict=True)):
        entity = (event.entity_type, event.entity_id)
        if entity in stopped:
            continue
        if isinstance(result, SidecarError) and not result.retryable:
            stopped.add(entity)
        elif result is None or isinstance(result, SidecarError):
            pending.append(index)
    return pending


def finish_results(events: Sequence[Event], results: list[BatchResult | None]) -> list[BatchResult]:
    """Final per-event results: an entity's events behind one that failed for good are
    reported as not published (FAILED_PRECONDITION), so nobody resends them alone."""
    finished: list[BatchResult] = []
    failed_at: dict[tuple[str, str], int] = {}
    for index, (event, result) in enumerate(zip(events, results, strict=True)):
        entity = (event.entity_type, event.entity_id)
        if entity in failed_at and not isinstance(result, Published):
            result = SidecarError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"not published: event #{failed_at[entity]} of this entity failed; "
                "send them again in order once it is fixed",
            )
        elif isinstance(result, SidecarError) and not result.retryable:
            failed_at.setdefault(entity, index)
        finished.append(
            result
            if result is not None
            else SidecarError(grpc.StatusCode.UNAVAILABLE, "not answered; retry")
        )
    return finished
