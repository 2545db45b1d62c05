"""Stopping background tasks for sure.

On Python 3.11, ``asyncio.wait_for`` (and libraries built on it) can swallow a
cancellation that arrives just as the awaited operation finishes, so a cancelled loop
may run on and ``await task`` never return. Loops therefore also check a flag, and
stopping waits a bounded time.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[None] | None, within: float = 5.0) -> None:
    """Cancel *task* and wait up to *within* seconds for it to end (never raises)."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait({task}, timeout=within)
    if not task.done():
        log.warning("background task %s did not stop within %ss", task.get_name(), within)
    elif not task.cancelled() and task.exception() is not None:
        log.debug("background task %s ended with %r", task.get_name(), task.exception())
