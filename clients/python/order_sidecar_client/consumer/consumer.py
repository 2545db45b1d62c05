"""The ordered consumer: partitions from an assignment, one worker per held partition."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Generic

from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from order_sidecar_client.consumer.apply import Applier, ConsumerMetrics, Handler
from order_sidecar_client.consumer.assignment import Assignment
from order_sidecar_client.consumer.breaker import CircuitBreaker
from order_sidecar_client.consumer.config import ConsumerConfig
from order_sidecar_client.consumer.dlq import DeadLetters, ensure_dlq_stream
from order_sidecar_client.consumer.errors import ConsumerConfigError, ConsumerError
from order_sidecar_client.consumer.positions import PositionStore, TxT
from order_sidecar_client.consumer.worker import PartitionWorker, WorkerContext

log = logging.getLogger(__name__)

META_PREFIX = "ordersidecar.subject_prefix"
META_PARTITIONS = "ordersidecar.partitions"


class OrderedConsumer(Generic[TxT]):
    """Applies a sidecar stream's events once and in order per entity.

    ``handler(event, tx)`` writes through *tx*, the transaction of *store* in which the
    entity's position moves too. It is called once per event, in stream order, for a
    batch of a partition's events sharing one transaction (``batch_size``); the events
    are acked after that transaction commits. Its exception rolls the transaction back:
    the events before the failing one are applied again and committed, the failing one
    is NAK'd with backoff, and after ``max_deliveries`` sent to the DLQ and its entity
    blocked. So a handler may run for an event whose transaction is then rolled back;
    only writes through *tx* are sure to happen once. Run :meth:`run` until
    :meth:`stop`; it raises :class:`GapError` when the gap policy is ``fail``.
    """

    def __init__(
        self,
        nc: NatsClient,
        config: ConsumerConfig,
        store: PositionStore[TxT],
        handler: Handler[TxT],
        assignment: Assignment,
        breaker: CircuitBreaker | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.nc = nc
        self.config = config
        self.assignment = assignment
        self.applier = Applier(store, handler)
        self.breaker = breaker
        self.metrics = ConsumerMetrics(registry)
        self._workers: dict[int, tuple[PartitionWorker[TxT], asyncio.Task[None]]] = {}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()

    @property
    def partitions_held(self) -> frozenset[int]:
        """Partitions with a running worker."""
        return frozenset(self._workers)

    async def run(self) -> None:
        """Process until :meth:`stop`; workers' fatal errors (GapError) propagate."""
        ctx = await self._context()
        partitions = await self._partition_count()
        try:
            while not self._stopping.is_set():
                await self._rebalance(ctx, partitions)
                self._raise_worker_errors()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.assignment.interval)
        finally:
            await self._stop_workers(set(self._workers))
            await self.assignment.close()

    async def stop(self) -> None:
        """Finish the current events, stop fetching and give the partitions up."""
        self._stopping.set()
        self._wake.set()

    async def _context(self) -> WorkerContext[TxT]:
        js = self.nc.jetstream()
        prefix = self.config.subject_prefix or await self._stream_meta(META_PREFIX)
        await ensure_dlq_stream(js, self.config.dlq_stream_name, self.config.dlq_subject_prefix)
        dead_letters = DeadLetters(
            js, self.config.stream, self.config.dlq_stream_name, self.config.dlq_subject_prefix
        )
        return WorkerContext(
            js,
            self.config,
            prefix,
            self.applier,
            dead_letters,
            self.assignment,
            self.metrics,
            self.breaker,
        )

    async def _partition_count(self) -> int:
        if self.config.partitions:
            return self.config.partitions
        return int(await self._stream_meta(META_PARTITIONS))

    async def _stream_meta(self, name: str) -> str:
        info = await self.nc.jetstream().stream_info(self.config.stream)
        value = (info.config.metadata or {}).get(name)
        if not value:
            raise ConsumerConfigError(
                f"stream {self.config.stream} has no {name} metadata: pass it in the config"
            )
        return value

    async def _rebalance(self, ctx: WorkerContext[TxT], partitions: int) -> None:
        plan = await self.assignment.refresh(partitions)
        await self._stop_workers(set(self._workers) - plan.keep)
        for partition in plan.surplus:
            await self.assignment.release(partition)
            log.info("released partition %d to balance replicas", partition)
        for partition in sorted(plan.keep - set(self._workers)):
            worker = PartitionWorker(partition, ctx)
            task = asyncio.create_task(worker.run(), name=f"partition-{partition}")
            task.add_done_callback(lambda _: self._wake.set())
            self._workers[partition] = (worker, task)
        self.metrics.partitions_held.set(len(self._workers))

    def _raise_worker_errors(self) -> None:
        for partition, (_, task) in list(self._workers.items()):
            if task.done():
                del self._workers[partition]
                error = None if task.cancelled() else task.exception()
                if isinstance(error, ConsumerError):
                    raise error  # a policy said stop (GapError): fail loudly
                if error is not None:
                    # A NATS hiccup or a bug in one partition: log it; the next
                    # rebalance restarts the partition from its durable consumer.
                    log.error("partition %d worker failed: %r", partition, error)

    async def _stop_workers(self, partitions: set[int]) -> None:
        # All at once: each may take up to a fetch timeout to notice.
        entries = [self._workers.pop(p) for p in partitions if p in self._workers]
        for worker, _ in entries:
            worker.stopping.set()
        await asyncio.gather(*(self._await_worker(w.partition, t) for w, t in entries))

    async def _await_worker(self, partition: int, task: asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(task), self.config.fetch_timeout + 5.0)
        except TimeoutError:
            task.cancel()
        except Exception as error:
            log.error("partition %d worker failed: %r", partition, error)
