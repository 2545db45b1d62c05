"""The NATS connection: connect once, then reconnect for as long as the sidecar runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nats.aio.client import Client as NatsClient

from order_sidecar.core.errors import Unavailable
from order_sidecar.telemetry.logs import redact_url

log = logging.getLogger(__name__)


STARTUP_CONNECT_ATTEMPTS = 3


async def connect_nats(
    url: str,
    name: str,
    on_reconnected: Callable[[], None] = lambda: None,
    options: Mapping[str, Any] | None = None,
) -> NatsClient:
    """Connect to NATS, reconnecting forever once connected; Unavailable if it is not there.

    *options*: more ``connect`` arguments, e.g. credentials and TLS from ``nats_options``.
    """
    client = NatsClient()

    def closing() -> bool:
        return bool(client.is_closed or client.is_draining)

    reasons: list[Exception] = []  # nats-py's final error hides why (NoServersError)
    tls_failed = asyncio.Event()

    async def on_error(error: Exception) -> None:
        reasons.append(error)
        if isinstance(error, ssl.SSLError):
            tls_failed.set()  # nats-py's connect never returns after a failed TLS handshake
        if not closing():
            log.warning("NATS connection error: %s", error)

    async def on_disconnect() -> None:
        if not closing():
            log.warning("NATS disconnected; reconnecting")

    async def on_reconnect() -> None:
        log.info("NATS reconnected")
        on_reconnected()

    connecting = client.connect(
        url,
        name=name,
        connect_timeout=2,
        max_reconnect_attempts=STARTUP_CONNECT_ATTEMPTS,
        reconnect_time_wait=1,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **(options or {}),
    )
    try:
        await _unless(connecting, tls_failed)
    except Exception as error:
        # The first error usually says why (e.g. Authorization Violation); later ones are
        # the closed socket's echoes.
        reason = reasons[0] if reasons else error
        raise Unavailable(f"cannot connect to NATS at {redact_url(url)}: {reason!r}") from error
    # nats-py applies one limit to the first connect and to reconnects; once connected,
    # a sidecar should wait out any NATS outage rather than give up.
    client.options["max_reconnect_attempts"] = -1
    return client


async def _unless(work: Awaitable[None], failed: asyncio.Event) -> None:
    """Await *work*; give up (TimeoutError) once *failed* is set."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(failed.wait())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TimeoutError("gave up connecting")
    task.result()
