"""``order-sidecar status``: ask a running sidecar for its state and print a table."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from .config import option
from .errors import Unavailable


@dataclass(frozen=True)
class StatusConfig:
    """Options of ``order-sidecar status``."""

    target: str = option("127.0.0.1:50051", "sidecar to ask, host:port")
    json: bool = option(False, "print the status as JSON")

    def validate(self) -> None:
        """Nothing to check beyond types."""


async def fetch_status(target: str) -> sidecar_pb2.SidecarStatus:
    """The sidecar's GetStatus answer; Unavailable when it does not answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        try:
            return await stub.GetStatus(sidecar_pb2.GetStatusRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            raise Unavailable(f"sidecar at {target} did not answer: {error.details()}") from error


def format_status(status: sidecar_pb2.SidecarStatus, as_json: bool) -> str:
    """A two-column table and the last errors, or JSON."""
    if as_json:
        return json.dumps(MessageToDict(status, preserving_proto_field_name=True), indent=2)
    rows = [
        ("producer", status.producer_id),
        ("version", status.version),
        ("uptime", f"{status.uptime_seconds:.0f}s"),
        ("stream", status.stream),
        ("nats", "connected" if status.nats_connected else "DISCONNECTED"),
        ("lock backend", f"{status.lock_backend} ({'up' if status.lock_backend_up else 'DOWN'})"),
        ("locks held", str(status.locks_held)),
        ("leases", str(status.leases)),
        ("entities busy", str(status.entities_busy)),
        ("queued behind an entity", str(status.queue_waiting)),
        ("requests in flight", str(status.requests_in_flight)),
        ("published", str(status.published)),
        ("duplicates", str(status.duplicates)),
        ("fenced by the broker", str(status.fenced)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append("")
    lines.append(f"last errors ({len(status.last_errors)}):" if status.last_errors else "no errors")
    for error in status.last_errors:
        at = error.at.ToDatetime().strftime("%H:%M:%S")
        lines.append(f"  {at} {error.rpc} {error.code} {error.entity_type}: {error.message}")
    return "\n".join(lines)
