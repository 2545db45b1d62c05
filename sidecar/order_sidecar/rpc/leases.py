"""The lease RPCs' request checks and reply building (the servicer stays small)."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from ordersidecar.v1 import sidecar_pb2

from order_sidecar.core.errors import InvalidEvent
from order_sidecar.core.leases import CallerLease
from order_sidecar.core.validation import check_entity

MIN_TTL = 0.5
MAX_TTL = 3600.0
MAX_WAIT = 3600.0


def lease_terms(
    request: sidecar_pb2.AcquireLeaseRequest, default_ttl: float, budget: float | None
) -> tuple[float, float]:
    """The lease's TTL and how long to wait, checked; the wait fits the call's deadline."""
    check_entity(request.entity_type, request.entity_id)
    ttl = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 0.0
    ttl = ttl or default_ttl
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidEvent(f"ttl must be {MIN_TTL:g}-{MAX_TTL:g} seconds, got {ttl:g}")
    wait = request.wait_timeout.ToNanoseconds() / 1e9 if request.HasField("wait_timeout") else 0.0
    if not 0 <= wait <= MAX_WAIT:
        raise InvalidEvent(f"wait_timeout must be 0-{MAX_WAIT:g} seconds, got {wait:g}")
    if budget is not None:
        # Leave time to answer before the caller's deadline.
        wait = max(0.0, min(wait, budget - 0.05))
    return ttl, wait


def lease_reply(lease: CallerLease) -> sidecar_pb2.Lease:
    """The Lease message for *lease*."""
    expires_at = Timestamp()
    expires_at.FromNanoseconds(int(lease.expires_at_wall * 1e9))
    ttl = Duration()
    ttl.FromNanoseconds(int(lease.ttl * 1e9))
    reply = sidecar_pb2.Lease(
        lease_id=lease.lease_id,
        entity_type=lease.entity_type,
        entity_id=lease.entity_id,
        fencing_token=lease.fencing_token,
        expires_at=expires_at,
        ttl=ttl,
    )
    if lease.position.version is not None:
        reply.last_version = lease.position.version
    return reply
