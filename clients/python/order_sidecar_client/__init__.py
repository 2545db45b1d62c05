"""Python client of nats-order-sidecar: sync and asyncio, typed, safe to retry.

>>> with SidecarClient("127.0.0.1:50051") as client:
...     client.publish(Event("patient", "42", "create", b'{"name": "Ada"}'))
"""

from ._async import AsyncSidecarClient
from ._lease import AsyncLease, Lease
from ._sync import SidecarClient
from ._types import Event, LeaseInfo, Published, RetryPolicy, SidecarError

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
