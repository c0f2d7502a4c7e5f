"""Redis availability as one shared circuit: an outage is logged once at its start and end.

Callers report failures; while the circuit is open nobody waits on Redis (every RPC goes to
PostgreSQL), and one probe per interval finds out when Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from agentstore import metrics
from agentstore.jobs import cancel_and_wait
from agentstore.redis.errors import REDIS_ERRORS

log = logging.getLogger(__name__)


class RedisCircuit:
    def __init__(self, client: aioredis.Redis, probe_interval: float = 0.25) -> None:
        self._client = client
        self._probe_interval = probe_interval
        self._available = True
        self._since = 0.0
        self._probe: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self._available

    def failed(self, exc: BaseException) -> None:
        if not self._available:
            return
        self._available = False
        self._since = time.monotonic()
        metrics.REDIS_OUTAGES.inc()
        metrics.DEPENDENCY_UP.labels("redis").set(0)
        log.warning("redis outage started: serving from PostgreSQL", extra={"error": type(exc).__name__})
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover(), name="redis-probe")

    async def ping(self) -> None:
        await self._client.ping()

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                await self._client.ping()
            except REDIS_ERRORS:
                continue  # still out
            self._available = True
            metrics.DEPENDENCY_UP.labels("redis").set(1)
            log.warning("redis outage ended", extra={"seconds": round(time.monotonic() - self._since, 3)})
            return

    async def close(self) -> None:
        await cancel_and_wait([self._probe])
