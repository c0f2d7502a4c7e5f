"""grpc.health.v1 statuses that follow the real state of the dependencies.

"" and `readiness` follow PostgreSQL, and so does every service that needs only PostgreSQL. A
service that needs Redis too (LockService, next) is NOT_SERVING while Redis is out. Redis is not a
health dependency of the server as a whole: without it only speed is lost, so its probe only
opens the outage circuit (logged and counted). `liveness` is SERVING while the process runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from grpc_health.v1 import health, health_pb2

from agentstore import metrics
from agentstore.db import Database
from agentstore.deps import POSTGRES, REDIS
from agentstore.redis import REDIS_ERRORS
from agentstore.redis.circuit import RedisCircuit

log = logging.getLogger(__name__)

# Health names beyond "" and the services: what Kubernetes' gRPC probes ask for.
LIVENESS, READINESS = "liveness", "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DependencyHealth:
    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        services: Mapping[str, Sequence[str]],
        db: Database,
        circuit: RedisCircuit,
        interval: float,
    ) -> None:
        """`services`: each service name and the dependencies it needs (deps.POSTGRES, deps.REDIS)."""
        self._servicer = servicer
        self._needs = {"": (POSTGRES,), READINESS: (POSTGRES,), **services}
        self._db = db
        self._circuit = circuit
        self._interval = interval
        self._statuses: dict[str, int] = {}

    async def start(self) -> None:
        """Everything SERVING (the server checked PostgreSQL while starting); `liveness` for good."""
        await self._servicer.set(LIVENESS, SERVING)
        await self._publish({POSTGRES: True, REDIS: True})

    async def run(self) -> None:
        """Probe every interval until cancelled; a status is set only when it changes."""
        while True:
            db_up = await self._db.ping(self._interval)
            metrics.DEPENDENCY_UP.labels(POSTGRES).set(1 if db_up else 0)
            if self._circuit.available:
                try:
                    await self._circuit.ping()
                except REDIS_ERRORS as exc:
                    self._circuit.failed(exc)
            was_up = self._statuses.get("") == SERVING
            await self._publish({POSTGRES: db_up, REDIS: self._circuit.available})
            if db_up != was_up:
                log.log(logging.INFO if db_up else logging.WARNING, "postgres %s", "up" if db_up else "down")
            await asyncio.sleep(self._interval)

    async def _publish(self, up: Mapping[str, bool]) -> None:
        for name, needs in self._needs.items():
            status = SERVING if all(up[dependency] for dependency in needs) else NOT_SERVING
            if self._statuses.get(name) != status:
                self._statuses[name] = status
                await self._servicer.set(name, status)

    async def shutting_down(self) -> None:
        await self._servicer.enter_graceful_shutdown()
