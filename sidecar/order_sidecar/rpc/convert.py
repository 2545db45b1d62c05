"""Requests into the core's model: a PublishRequest validated into an Event."""

from __future__ import annotations

import uuid

from ordersidecar.v1 import sidecar_pb2

from order_sidecar.core.errors import InvalidEvent
from order_sidecar.core.model import Event
from order_sidecar.core.validation import (
    check_entity_id,
    check_entity_type,
    check_headers,
    check_idempotency_key,
)

_OPERATION_NAMES = {
    sidecar_pb2.OPERATION_CREATE: "create",
    sidecar_pb2.OPERATION_UPDATE: "update",
    sidecar_pb2.OPERATION_DELETE: "delete",
}


def event_from_request(request: sidecar_pb2.PublishRequest) -> Event:
    """Validate *request*; raise InvalidEvent saying what to fix."""
    check_entity_type(request.entity_type)
    check_entity_id(request.entity_id)
    operation = _OPERATION_NAMES.get(request.operation)
    if operation is None:
        raise InvalidEvent(
            f"operation {request.operation} is not allowed: use OPERATION_CREATE, "
            "OPERATION_UPDATE or OPERATION_DELETE"
        )
    headers = dict(request.headers)
    check_headers(headers)
    key = request.idempotency_key
    check_idempotency_key(key)
    return Event(
        entity_type=request.entity_type,
        entity_id=request.entity_id,
        operation=operation,
        payload=request.payload,
        headers=headers,
        idempotency_key=key or f"gen-{uuid.uuid4().hex}",
        lease_id=request.lease_id,
        expected_sequence=(
            request.expected_sequence if request.HasField("expected_sequence") else None
        ),
        entity_version=request.entity_version if request.HasField("entity_version") else None,
    )
