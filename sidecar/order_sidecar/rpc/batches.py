"""PublishBatch's and PublishStream's helpers: a batch's events validated and grouped by
entity, and publish outcomes as reply messages (an error as a per-event status)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from ordersidecar.v1 import sidecar_pb2

from order_sidecar.core.errors import EarlierEventFailed, InvalidEvent, SidecarError
from order_sidecar.core.model import Event, Stored
from order_sidecar.rpc.convert import event_from_request
from order_sidecar.rpc.status import grpc_status

BatchOutcome = Stored | SidecarError


def group_by_entity(
    requests: Iterable[sidecar_pb2.PublishRequest], outcomes: list[BatchOutcome | None]
) -> list[tuple[list[int], list[Event]]]:
    """Validate every event and group valid entities' events, keeping request order.

    An entity with an invalid event publishes none of its events in this batch, so
    that no later event lands without the earlier one the caller meant to precede it.
    """
    by_entity: dict[tuple[str, str], list[tuple[int, Event | SidecarError]]] = defaultdict(list)
    for index, request in enumerate(requests):
        key = (request.entity_type, request.entity_id)
        try:
            by_entity[key].append((index, event_from_request(request)))
        except SidecarError as error:
            by_entity[key].append((index, error))
    groups = []
    for items in by_entity.values():
        invalid = [index for index, item in items if isinstance(item, SidecarError)]
        if not invalid:
            groups.append(([i for i, _ in items], [e for _, e in items if isinstance(e, Event)]))
            continue
        for index, item in items:
            outcomes[index] = (
                item
                if isinstance(item, SidecarError)
                else EarlierEventFailed(
                    f"not published: event #{invalid[0]} of the same entity in this batch "
                    "is invalid; fix it and send the entity's events again",
                    InvalidEvent("invalid"),
                )
            )
    return groups


def reply_of(stored: Stored) -> sidecar_pb2.PublishResponse:
    """A stored event as Publish's reply."""
    return sidecar_pb2.PublishResponse(
        sequence=stored.sequence,
        stream_sequence=stored.stream_sequence,
        subject=stored.subject,
        duplicate=stored.duplicate,
    )


def result_of(outcome: BatchOutcome) -> sidecar_pb2.PublishResult:
    """One event's outcome in a batch or stream: its reply, or its error as a status."""
    if isinstance(outcome, Stored):
        return sidecar_pb2.PublishResult(response=reply_of(outcome), code=0)
    code, message = grpc_status(outcome)
    return sidecar_pb2.PublishResult(code=code.value[0], message=message)
