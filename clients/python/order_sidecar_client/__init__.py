"""Python client of nats-order-sidecar: sync and asyncio, typed, safe to retry.

>>> with SidecarClient("127.0.0.1:50051") as client:
...     client.publish(Event("patient", "42", "create", b'{"name": "Ada"}'))
"""

from order_sidecar_client._async import AsyncSidecarClient
from order_sidecar_client._lease import AsyncLease, Lease
from order_sidecar_client._sync import SidecarClient
from order_sidecar_client._types import Event, LeaseInfo, Published, RetryPolicy, SidecarError

__all__ = [
    "AsyncLease",
    "AsyncSidecarClient",
    "Event",
    "Lease",
    "LeaseInfo",
    "Published",
    "RetryPolicy",
    "SidecarClient",
    "SidecarError",
]
