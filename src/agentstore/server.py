"""The composition root: the server is built from the list of resources, and nothing here is
resource-specific. Start-up acquires everything through one AsyncExitStack, so a failure at any
step closes what was opened, in reverse order; `App.stop` closes the same stack after a graceful
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from agentstore import metrics
from agentstore.cache.entity import EntityCache
from agentstore.config import Settings
from agentstore.db import Database
from agentstore.deps import Deps, Resource
from agentstore.errors import StartupError
from agentstore.health import DependencyHealth
from agentstore.interceptor import ApiInterceptor, register_unwrapped
from agentstore.jobs import cancel_and_wait, run_periodically
from agentstore.logs import AccessLog
from agentstore.redis.bus import ProcessBus
from agentstore.redis.circuit import RedisCircuit
from agentstore.resources import achievements, agents, audit, sessions, tasks, tenants

log = logging.getLogger(__name__)

# The resources the server is built from: adding one is its module, its protos, its migration and
# a line here.
RESOURCES: tuple[Resource, ...] = (
    agents.RESOURCE,
    tenants.RESOURCE,
    tasks.RESOURCE,
    sessions.RESOURCE,
    achievements.RESOURCE,
    audit.RESOURCE,
)


@dataclass
class App:
    """A running agentstore server and everything it owns."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    deps: Deps
    health: DependencyHealth
    servicers: dict[str, Any]
    _resources: contextlib.AsyncExitStack

    @property
    def db(self) -> Database:
        return self.deps.db

    @property
    def redis(self) -> aioredis.Redis:
        return self.deps.redis

    @property
    def bus(self) -> ProcessBus:
        return self.deps.bus

    @property
    def circuit(self) -> RedisCircuit:
        return self.deps.circuit

    @property
    def caches(self) -> dict[str, EntityCache]:
        return self.deps.caches

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, in-flight RPCs get `grace` seconds, then everything closes."""
        await self.health.shutting_down()
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self._resources.aclose()


async def start_server(
    settings: Settings, database_url: str, redis_url: str, resources: tuple[Resource, ...] = RESOURCES
) -> App:
    """Open the pools, check the database role, and start serving. Raises StartupError."""
    async with contextlib.AsyncExitStack() as stack:
        db = Database(settings, database_url)
        await db.open()
        stack.push_async_callback(db.close)
        problem = await db.check_role()
        if problem is not None:
            raise StartupError(problem)

        deps = await Deps.connect(stack, settings, db, redis_url)
        authenticator = deps.authenticator

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.max_send_message_length", settings.max_send_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        access = AccessLog() if settings.access_log else None
        if access is not None:
            stack.callback(access.flush)
        interceptor = ApiInterceptor(
            authenticator,
            access_log=access,
            platform_services=frozenset(r.service for r in resources if r.platform),
            max_request_bytes=settings.max_request_bytes,
            large_requests=frozenset(name for r in resources for name in r.large_requests),
        )
        servicers: dict[str, Any] = {}
        for resource in resources:
            resource.register(_adder(server, interceptor, servicers), deps)
        health_servicer = health.aio.HealthServicer()
        limit = settings.max_request_bytes
        register_unwrapped(server, health_pb2_grpc.add_HealthServicer_to_server, health_servicer, limit)
        probe = DependencyHealth(
            health_servicer,
            {r.service: r.dependencies for r in resources},
            db,
            deps.circuit,
            settings.health_probe_interval_seconds,
        )
        await probe.start()
        if settings.reflection_enabled:
            names = (*(r.service for r in resources), health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflector = reflection.aio.ReflectionServicer(names)
            register_unwrapped(server, reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflector, limit)

        try:
            port = server.add_insecure_port(settings.listen_address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {settings.listen_address}")
        await server.start()
        stack.push_async_callback(server.stop, 0)
        if settings.metrics_port:
            host = metrics.host_for(settings)
            try:
                stack.callback(metrics.serve(settings.metrics_port, host))
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {host}:{settings.metrics_port}: {exc.strerror}") from None
        deps.bus.start()
        background = [asyncio.create_task(probe.run(), name="health-probe")]
        background += [
            asyncio.create_task(run_periodically(job.what, job.interval, job.run), name=job.what) for job in deps.jobs
        ]
        stack.push_async_callback(cancel_and_wait, background)
        log.info("serving", extra={"address": settings.listen_address, "port": port})
        return App(settings, server, port, deps, probe, servicers, stack.pop_all())
    raise AssertionError("unreachable")


def _adder(server: grpc.aio.Server, interceptor: ApiInterceptor, servicers: dict[str, Any]) -> Callable[..., None]:
    def add(add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        interceptor.register(server, add_to_server, servicer)
        servicers[type(servicer).__name__] = servicer

    return add


async def serve_until_signalled(app: App) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await app.stop()
