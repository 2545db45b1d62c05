"""Caller-held leases: hold an entity's lock across your own transaction.

>>> async with client.lease("patient", "42") as lease:
...     row = await db.read(42)              # nobody else publishes patient 42 now
...     await db.write(42, new_row)
...     await lease.publish(Event("patient", "42", "update", payload, entity_version=v))

The lease is renewed in the background at a third of its TTL while the block runs and
released when it ends. If it is lost anyway (the process stalled past the TTL), the
next publish under it raises SidecarError with FAILED_PRECONDITION and publishes
nothing: acquire a new lease and redo the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING

import grpc
from ordersidecar.v1 import sidecar_pb2

from order_sidecar_client._types import (
    Event,
    LeaseInfo,
    Published,
    SidecarError,
    check_lease_entity,
)

if TYPE_CHECKING:
    from ._async import AsyncSidecarClient
    from ._sync import SidecarClient


class AsyncLease:
    """A lease held through an :class:`AsyncSidecarClient`."""

    def __init__(self, client: AsyncSidecarClient, info: LeaseInfo) -> None:
        self._client = client
        self.info = info
        #: The error that ended background renewal, if it ended.
        self.renewal_error: SidecarError | None = None

    @property
    def fencing_token(self) -> int:
        """The entity's last sequence when the lease was acquired."""
        return self.info.fencing_token

    async def publish(self, event: Event) -> Published:
        """Publish *event* under this lease (transient failures retried, same key)."""
        check_lease_entity(self.info, event)
        return await self._client._publish_request(event.to_request(self.info.lease_id))

    async def renew(self) -> LeaseInfo:
        """Extend the lease by its TTL now."""
        self.info = await self._client._renew(self.info.lease_id)
        return self.info

    async def release(self) -> None:
        """Give the lease up (an already expired one is fine)."""
        with contextlib.suppress(SidecarError):
            await self._client._release(self.info.lease_id)

    async def _keep_renewed(self) -> None:
        while True:
            await asyncio.sleep(self.info.ttl / 3)
            try:
                await self.renew()
            except SidecarError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    self.renewal_error = error
                    return


class Lease:
    """A lease held through a blocking :class:`SidecarClient`; renewed by a thread."""

    def __init__(self, client: SidecarClient, info: LeaseInfo) -> None:
        self._client = client
        self.info = info
        self.renewal_error: SidecarError | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._keep_renewed, daemon=True)

    @property
    def fencing_token(self) -> int:
        """The entity's last sequence when the lease was acquired."""
        return self.info.fencing_token

    def publish(self, event: Event) -> Published:
        """Publish *event* under this lease (transient failures retried, same key)."""
        check_lease_entity(self.info, event)
        return self._client._publish_request(event.to_request(self.info.lease_id))

    def renew(self) -> LeaseInfo:
        """Extend the lease by its TTL now."""
        self.info = self._client._renew(self.info.lease_id)
        return self.info

    def release(self) -> None:
        """Stop renewing and give the lease up."""
        self._stop.set()
        with contextlib.suppress(SidecarError):
            self._client._release(self.info.lease_id)

    def _start(self) -> None:
        self._renewer.start()

    def _keep_renewed(self) -> None:
        while not self._stop.wait(self.info.ttl / 3):
            try:
                self.renew()
            except SidecarError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    self.renewal_error = error
                    return


def release_request(lease_id: str) -> sidecar_pb2.ReleaseLeaseRequest:
    """A ReleaseLeaseRequest."""
    return sidecar_pb2.ReleaseLeaseRequest(lease_id=lease_id)
