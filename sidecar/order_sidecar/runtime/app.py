"""Wiring and lifecycle of ``order-sidecar serve``: connect, provision, serve, drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import nats.errors
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NatsClient
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar import __version__
from order_sidecar.core.committer import GroupCommitter
from order_sidecar.core.errors import Unavailable
from order_sidecar.core.gates import EntityGates, LockPolicy
from order_sidecar.core.leases import LeaseRegistry
from order_sidecar.core.ports import LockBackend
from order_sidecar.core.publisher import Publisher
from order_sidecar.core.tasks import cancel_and_wait
from order_sidecar.jetstream.connection import connect_nats
from order_sidecar.jetstream.embedded import EmbeddedNats, default_data_dir
from order_sidecar.jetstream.stream import EventStream
from order_sidecar.locks.instrumented import InstrumentedLocks
from order_sidecar.locks.nats_kv import NatsKvLockBackend
from order_sidecar.locks.redis import RedisLockBackend
from order_sidecar.rpc.auth import server_interceptors
from order_sidecar.rpc.servicer import SidecarService
from order_sidecar.runtime.config import ServeConfig
from order_sidecar.runtime.security import (
    Secrets,
    check_redis_credentials,
    load_secrets,
    nats_options,
    redis_options,
    server_credentials,
    warn_if_exposed,
)
from order_sidecar.telemetry.logs import redact_url
from order_sidecar.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"].full_name


class SidecarApp:
    """One running sidecar."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self._nc: NatsClient | None = None
        self._locks: LockBackend | None = None
        self._embedded: EmbeddedNats | None = None
        self._health = health_aio.HealthServicer()
        self.metrics = Metrics()
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._locks_up = True
        self.publisher: Publisher | None = None
        self.committer: GroupCommitter | None = None
        self.publish_path = "not started"
        self._service: SidecarService | None = None
        self._secrets = Secrets()
        self.port = 0

    @property
    def target(self) -> str:
        """Where the gRPC server listens, as host:port (the real port when 0 was asked)."""
        return f"{self.config.listen.rpartition(':')[0]}:{self.port}"

    async def start(self) -> None:
        """Connect to NATS, provision the stream and start serving gRPC."""
        cfg = self.config
        self._secrets = load_secrets(cfg, os.environ)
        warn_if_exposed(cfg, self._secrets)
        credentials = server_credentials(cfg)  # bad certificates stop us before any work
        nats_url = cfg.nats_url
        if not nats_url:
            data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
            self._embedded = EmbeddedNats(data_dir, cfg.nats_sync_interval)
            nats_url = await self._embedded.start()
        self._nc = await connect_nats(
            nats_url,
            f"order-sidecar {cfg.producer_name}",
            self.metrics.nats_reconnects.inc,
            nats_options(cfg, self._secrets),
        )
        stream = EventStream(self._nc, cfg)
        await stream.ensure_stream()
        locks = self._locks = InstrumentedLocks(await self._open_locks(self._nc), self.metrics)
        policy = LockPolicy(
            cfg.lock_ttl,
            cfg.lock_wait,
            cfg.on_lock_unavailable == "reject",
            linger=cfg.lock_linger,
            hints=cfg.position_hints,
        )
        self.committer = self._committer(stream)
        self.publisher = Publisher(
            stream,
            EntityGates(locks, policy),
            LeaseRegistry(locks, stream, cfg.stream),
            cfg.stream,
            cfg.max_conflict_retries,
            on_fenced=self.metrics.fencing_rejections.inc,
            committer=self.committer,
        )
        server = grpc.aio.server(
            interceptors=server_interceptors(self._secrets.auth_token),
            options=[("grpc.max_receive_message_length", cfg.max_message_bytes)],
        )
        self._service = SidecarService(
            self.publisher,
            cfg.max_batch,
            cfg.max_inflight_entities,
            cfg.lock_ttl,
            cfg.stream_window,
            self.metrics,
            self._status,
            max_streams=cfg.max_streams,
        )
        sidecar_pb2_grpc.add_SidecarServicer_to_server(self._service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = (
                server.add_secure_port(cfg.listen, credentials)
                if credentials
                else server.add_insecure_port(cfg.listen)
            )
        except RuntimeError as error:
            raise Unavailable(f"cannot listen on {cfg.listen}: {error}") from error
        if self.port == 0:
            raise Unavailable(f"cannot listen on {cfg.listen}: address in use or not local")
        await server.start()
        self._server = server
        await self._set_health(serving=True)
        gates = self.publisher._gates
        self.metrics.watch_queues(lambda: gates.busy_entities, lambda: gates.waiting)
        if cfg.metrics_listen:
            self._metrics_server, self.metrics_port = self.metrics.serve(cfg.metrics_listen)
        self._watcher = asyncio.create_task(self._watch_backends())
        log.info(
            "order-sidecar %s listening on %s (%s); stream %s on %s; locks: %s; publishing: %s",
            cfg.producer_name,
            self.target,
            _transport(cfg, self._secrets),
            cfg.stream,
            redact_url(nats_url),
            self._lock_description(),
            self.publish_path,
        )

    def _committer(self, stream: EventStream) -> GroupCommitter | None:
        """Group commit where the server and stream allow it (and it is not turned off)."""
        cfg = self.config
        if cfg.group_commit and stream.atomic:
            self.publish_path = "group-commit"
            return GroupCommitter(stream, cfg.batch_max_events, cfg.batches_in_flight)
        if not cfg.group_commit:
            self.publish_path = "one-by-one (--no-group-commit)"
        else:
            self.publish_path = "one-by-one (server before 2.12 or stream without allow_atomic)"
        return None

    async def _open_locks(self, nc: NatsClient) -> LockBackend:
        cfg = self.config
        if cfg.chosen_lock_backend == "redis":
            options = redis_options(cfg, self._secrets)
            await check_redis_credentials(cfg.redis_url, options)
            return RedisLockBackend(list(cfg.redis_url), options=options)
        return await NatsKvLockBackend.open(
            nc, cfg.lock_bucket, cfg.kv_replicas, lock_ttl=cfg.lock_ttl
        )

    def _lock_description(self) -> str:
        if self.config.chosen_lock_backend == "redis":
            return "redis " + ",".join(redact_url(url) for url in self.config.redis_url)
        return f"nats-kv bucket {self.config.lock_bucket}"

    def _status(self) -> sidecar_pb2.SidecarStatus:
        cfg = self.config
        publisher = self.publisher
        assert publisher is not None and self._locks is not None
        gates = publisher.gates
        held = self.metrics.registry.get_sample_value(
            "ordersidecar_locks_held", {"backend": self._locks.name}
        )
        return sidecar_pb2.SidecarStatus(
            producer_id=cfg.producer_name,
            version=__version__,
            uptime_seconds=time.monotonic() - self._started_at,
            stream=cfg.stream,
            nats_connected=bool(self._nc and self._nc.is_connected),
            lock_backend=self._locks.name,
            lock_backend_up=self._locks_up,
            locks_held=int(held or 0),
            entities_busy=gates.busy_entities,
            queue_waiting=gates.waiting,
            published=publisher.stats.published,
            duplicates=publisher.stats.duplicates,
            fenced=publisher.stats.fenced,
            leases=publisher.leases.count,
            publish_path=self.publish_path,
            batches_committed=self.committer.stats.batches if self.committer else 0,
            batched_events=self.committer.stats.batched_events if self.committer else 0,
        )

    async def _watch_backends(self) -> None:
        """Tell health checks and metrics whether NATS and the lock backend answer.

        NOT_SERVING while NATS is unreachable, or the lock backend is and the sidecar
        would refuse publishes without it (--on-lock-unavailable reject).
        """
        assert self._nc is not None and self._locks is not None
        reject = self.config.on_lock_unavailable == "reject"
        while not self._stopping:
            nats_up = self._nc.is_connected
            try:
                locks_up = await asyncio.wait_for(self._locks.healthy(), 2.0)
            except Exception as error:  # a broken check must not freeze health
                log.debug("lock backend health check failed: %r", error)
                locks_up = False
            if self.publisher is not None:
                await self.publisher.leases.forget_expired()
            self.metrics.backend_up.labels("nats").set(nats_up)
            self.metrics.backend_up.labels(self._locks.name).set(locks_up)
            if locks_up and not self._locks_up:
                self.metrics.lock_backend_reconnects.labels(self._locks.name).inc()
            self._locks_up = locks_up
            await self._set_health(serving=nats_up and (locks_up or not reject))
            await asyncio.sleep(self.config.health_interval)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self) -> None:
        """Stop taking RPCs, finish those in flight, release locks, close connections."""
        self._stopping = True
        await cancel_and_wait(self._watcher)
        await self._health.enter_graceful_shutdown()
        if self._service is not None:
            left = await self._service.drain(self.config.shutdown_grace)
            if left:
                log.warning("%d requests still running after the grace period: cancelled", left)
        if self._server is not None:
            await self._server.stop(0)
        if self.publisher is not None:
            await self.publisher._gates.close()
            await self.publisher.leases.release_all()
        if self._locks is not None:
            await self._locks.close()
        if self._nc is not None and not self._nc.is_closed:
            # Give up reconnecting first: nats-py's reconnect loop survives cancellation and
            # would keep the process from exiting while NATS is down.
            self._nc.options["max_reconnect_attempts"] = 1
            # Bounded: nats-py's drain/close can hang while it is reconnecting.
            closing = self._nc.drain() if self._nc.is_connected else self._nc.close()
            try:
                await asyncio.wait_for(closing, 10.0)
            except (TimeoutError, nats.errors.Error) as error:
                log.warning("NATS connection did not close cleanly: %r", error)
        if self._embedded is not None:
            self._embedded.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("order-sidecar stopped")

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
            log.info("signal received: draining")
        finally:
            await self.stop()


def _transport(config: ServeConfig, secrets: Secrets) -> str:
    """How the gRPC port is protected, for the start-up line (never the secrets)."""
    tls = "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    return tls + (", token required" if secrets.auth_token else "")
