"""Reads of many entities' last events in one request: JetStream's batched direct get.

Concurrent ``EventStream.position`` calls that find every read slot busy are answered
together by one ``multi_last`` direct get (nats-server 2.11+, ``allow_direct``): one
request, one message per entity that has events, then an end-of-batch status. Nothing
waits on purpose; a read that finds a free slot goes at once, on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient

from order_sidecar.core.errors import Unavailable
from order_sidecar.core.model import EntityPosition

#: JetStream answers at most 1,024 subjects per multi_last request.
MAX_SUBJECTS = 1000
MAX_IN_FLIGHT = 4
Single = Callable[[str], Awaitable[EntityPosition]]
Parse = Callable[[str, dict[str, str], int, bytes], EntityPosition]


class BulkReads:
    """Coalesces concurrent reads of entities' last events (replica reads only)."""

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        single: Single,
        parse: Parse,
        timeout: float,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._single = single
        self._parse = parse
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._queue: dict[str, list[asyncio.Future[EntityPosition]]] = {}
        self._in_flight = 0
        self._pump_scheduled = False
        #: Reads answered by a batched get, and those batched gets.
        self.batched_reads = 0
        self.batches = 0

    async def position(self, subject: str) -> EntityPosition:
        """*subject*'s last event, read alone or with others that wait meanwhile."""
        future: asyncio.Future[EntityPosition] = asyncio.get_running_loop().create_future()
        self._queue.setdefault(subject, []).append(future)
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)
        return await future

    def _pump(self) -> None:
        self._pump_scheduled = False
        while self._queue and self._in_flight < self._max_in_flight:
            subjects = list(self._queue)[:MAX_SUBJECTS]
            waiting = {subject: self._queue.pop(subject) for subject in subjects}
            self._in_flight += 1
            task = asyncio.ensure_future(self._read(waiting))
            task.add_done_callback(self._done)

    def _done(self, _: asyncio.Future[None]) -> None:
        self._in_flight -= 1
        if self._queue and not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    async def _read(self, waiting: dict[str, list[asyncio.Future[EntityPosition]]]) -> None:
        try:
            if len(waiting) == 1:
                (subject,) = waiting
                positions = {subject: await self._single(subject)}
            else:
                positions = await self._multi_last(list(waiting))
                self.batches += 1
                self.batched_reads += len(waiting)
        except Exception as error:
            for futures in waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            return
        for subject, futures in waiting.items():
            for future in futures:
                if not future.done():
                    future.set_result(positions.get(subject, EntityPosition(0, 0)))

    async def _multi_last(self, subjects: list[str]) -> dict[str, EntityPosition]:
        """The last event of each of *subjects* that has one."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        found: dict[str, EntityPosition] = {}
        try:
            request = json.dumps({"multi_last": subjects}).encode()
            await self._nc.publish(f"$JS.API.DIRECT.GET.{self._stream}", request, reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout=self._timeout)
                except TimeoutError as error:
                    raise Unavailable(
                        f"NATS did not answer reading {len(subjects)} entities; retry later"
                    ) from error
                headers = dict(msg.headers or {})
                status = headers.get("Status")
                if status in ("204", "404"):  # end of the batch; no subject had events
                    return found
                if status:
                    raise Unavailable(f"batched read refused ({status}); retry later")
                subject = headers["Nats-Subject"]
                found[subject] = self._parse(
                    subject, headers, int(headers["Nats-Sequence"]), msg.data
                )
        finally:
            await sub.unsubscribe()
