"""What the server is built from: a list of resources, each registering its service on `Deps`.

A resource module exposes `RESOURCE = Resource(service name, register)`. `register(add, deps)`
builds its servicer from the shared connections in `deps` and hands it to `add` (which wraps every
handler in the interceptor). Components several resources use (the agent cache, the leaderboard,
the task queue) are built once per server by `deps.shared(factory)`, whichever resource asks
first; background jobs are added with `deps.add_job`. So adding a resource touches its own
module, its protos, its migration and the list in server.py, and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis

from agentstore.auth import Authenticator
from agentstore.cache.entity import EntityCache
from agentstore.cache.l1 import L1Cache
from agentstore.cache.l2 import L2Cache
from agentstore.cache.repairs import CacheRepairs
from agentstore.cache.trust import CacheTrust
from agentstore.config import Settings
from agentstore.db import Database
from agentstore.redis.bus import ProcessBus
from agentstore.redis.circuit import RedisCircuit
from agentstore.redis.pipelined_get import PipelinedGet
from agentstore.resources.paging import Pages

T = TypeVar("T")

POSTGRES = "postgres"
REDIS = "redis"

# add(add_XServiceServicer_to_server, servicer): registers a servicer, every handler wrapped.
Add = Callable[[Callable[[Any, Any], None], Any], None]


@dataclass(frozen=True)
class Job:
    """A background job: `run` every `interval` seconds (it returns how much it did)."""

    what: str
    interval: float
    run: Callable[[], Awaitable[int]]


@dataclass(frozen=True)
class Resource:
    service: str  # the full gRPC service name: health and reflection list it
    register: Callable[[Add, Deps], None]
    # What must answer for grpc.health.v1 to report this service SERVING.
    dependencies: tuple[str, ...] = (POSTGRES,)
    # RPCs whose requests may be as large as AGENTSTORE_MAX_RECEIVE_MESSAGE_BYTES (batches); every
    # other one takes at most AGENTSTORE_MAX_REQUEST_BYTES.
    large_requests: tuple[str, ...] = ()
    # Authenticated with the platform admin token instead of an API key (TenantService).
    platform: bool = False

    @staticmethod
    def of(module: ModuleType, name: str, register: Callable[[Add, Deps], None], **options: Any) -> Resource:
        """The resource of service `name`, declared in the generated `module` (…_service_pb2)."""
        return Resource(module.DESCRIPTOR.services_by_name[name].full_name, register, **options)


@dataclass
class Deps:
    settings: Settings
    db: Database
    redis: aioredis.Redis
    bus: ProcessBus
    circuit: RedisCircuit
    trust: CacheTrust
    repairs: CacheRepairs
    l2: L2Cache
    pages: Pages
    authenticator: Authenticator
    # Entity caches by kind, for introspection (tests, `agentstore check`).
    caches: dict[str, EntityCache] = field(default_factory=dict)
    jobs: list[Job] = field(default_factory=list)
    _shared: dict[object, object] = field(default_factory=dict)

    @staticmethod
    async def connect(stack: contextlib.AsyncExitStack, settings: Settings, db: Database, redis_url: str) -> Deps:
        """Everything the resources share, on an open database; what needs closing goes on `stack`."""
        timeout = settings.redis_timeout_seconds
        client = aioredis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        stack.push_async_callback(client.aclose)
        # L2 reads (the GetAgent hot path) go over one pipelined connection instead of redis-py's pool.
        l2_get = PipelinedGet.for_client(client)
        if l2_get is not None:
            stack.callback(l2_get.close)
        circuit = RedisCircuit(client)
        stack.push_async_callback(circuit.close)
        trust = CacheTrust(settings.cache_lease_seconds)
        bus = ProcessBus(redis_url, f"{settings.redis_key_prefix}invalidate", client, trust)
        stack.push_async_callback(bus.close)
        authenticator = Authenticator(db, settings)
        authenticator.attach_bus(bus)
        deps = Deps(
            settings=settings,
            db=db,
            redis=client,
            bus=bus,
            circuit=circuit,
            trust=trust,
            repairs=CacheRepairs(db, circuit, trust, settings.redis_key_prefix),
            l2=L2Cache(client, settings.cache_l2_ttl_seconds, l2_get),
            pages=Pages.for_settings(db, settings),
            authenticator=authenticator,
        )
        deps.add_job("cache repairs done", settings.cache_repair_poll_seconds, deps.repairs.poll)
        deps.add_job("old cache repairs pruned", 60.0, deps.repairs.prune)
        return deps

    def shared(self, factory: Callable[[Deps], T]) -> T:
        """The one instance per server of what `factory` builds."""
        if factory not in self._shared:
            self._shared[factory] = factory(self)
        return cast(T, self._shared[factory])

    def cache_of(self, kind: str, build: Callable[[L1Cache], EntityCache]) -> EntityCache:
        """Register the read-through cache of one entity kind, built on an L1 of its own (so that
        one kind's churn cannot evict another's); spec.entity_cache builds one from a resource spec."""
        if kind in self.caches:
            raise ValueError(f"a cache of kind {kind!r} exists already")
        s = self.settings
        cache = build(L1Cache(s.cache_l1_max_entries, s.cache_l1_ttl_seconds))
        self.caches[kind] = cache
        return cache

    def add_job(self, what: str, interval: float, run: Callable[[], Awaitable[int]]) -> None:
        """Run `run` in the background every `interval` seconds (0 disables it)."""
        if interval > 0:
            self.jobs.append(Job(what, interval, run))
