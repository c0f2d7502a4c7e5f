"""Background jobs: running them periodically, stopping them reliably, and the tenants they visit."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable

from agentstore import metrics
from agentstore.db import Database
from agentstore.errors import ApiError

log = logging.getLogger(__name__)


async def run_periodically(what: str, interval: float, job: Callable[[], Awaitable[int]]) -> None:
    """Run `job` now and then every `interval` seconds until cancelled; a round that did something
    logs how much (`job`'s count).

    A failed round is logged once when a run of failures starts (an ApiError, such as the database
    being unreachable, with its reason; anything else, a bug, with its traceback) and once when the
    job succeeds again, with how many rounds failed; in between failures are only counted
    (agentstore_job_failures_total), so an outage does not flood the log. A failure of another
    kind within the run is logged as it starts too.
    """
    failures = 0
    last: str | None = None
    counter = metrics.JOB_FAILURES.labels(what)
    while True:
        try:
            count = await job()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            counter.inc()
            kind = f"{type(exc).__name__}:{exc.reason}" if isinstance(exc, ApiError) else type(exc).__name__
            if kind != last:
                last = kind
                if isinstance(exc, ApiError):
                    log.warning(f"{what} failed", extra={"reason": exc.reason, "error": exc.message})
                else:
                    log.exception(f"{what} failed", extra={"error": type(exc).__name__})
        else:
            if failures:
                log.warning(f"{what} works again", extra={"failed_rounds": failures})
                failures, last = 0, None
            if count:
                log.info(what, extra={"count": count})
        await asyncio.sleep(interval)


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


LIST_TENANT_IDS = "SELECT id FROM tenants ORDER BY id"


async def all_tenant_ids(db: Database) -> list[uuid.UUID]:
    """Every tenant, read under the platform scope: for jobs that visit each tenant in turn."""
    rows = await db.run(lambda con: con.fetch(LIST_TENANT_IDS), None, readonly=True, platform_scope=True)
    return [row["id"] for row in rows]
