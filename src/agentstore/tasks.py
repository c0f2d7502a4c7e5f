"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None] | None]) -> None:
    """Cancel until done. One cancel() is not always enough: redis-py's asyncio client often
    swallows a cancellation that lands during a command (seen with redis-py 8.1 on PING), and on
    Python 3.11 one that lands while asyncio.timeout() or wait_for() expires can turn into a
    TimeoutError that a broad `except` absorbs."""
    pending = {t for t in tasks if t is not None and not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
