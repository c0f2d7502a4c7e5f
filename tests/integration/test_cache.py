"""The two-tier read cache against real Redis and PostgreSQL: never stale after a write."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from agentstore.devtools.embedded import EmbeddedRedis, free_port
from agentstore.server import App, start_server
from agentstore.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.conftest import ScratchDatabase, Servers
from tests.integration import conftest as itc
from tests.integration.helpers import HeldFills, Metadata, caches_trusted, create_agent, expect_error, unique

NO_CACHE = (("cache-control", "no-cache"),)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def version_of(resource: agent_pb2.Agent | task_pb2.Task) -> int:
    return int(resource.etag.strip('"'))


async def rename(stub: agent_service_pb2_grpc.AgentServiceStub, md: Metadata, agent_id: str) -> agent_pb2.Agent:
    request = agent_service_pb2.UpdateAgentRequest(
        agent=agent_pb2.Agent(id=agent_id, role=unique("role")),
        update_mask=field_mask_pb2.FieldMask(paths=["role"]),
    )
    return await stub.UpdateAgent(request, metadata=md)


async def get(stub: agent_service_pb2_grpc.AgentServiceStub, md: Metadata, agent_id: str) -> agent_pb2.Agent:
    return await stub.GetAgent(agent_service_pb2.GetAgentRequest(id=agent_id), metadata=md)


# --- cache hits, tenancy, opt-out, single-flight (in-process server) -----------------------------


async def test_get_after_write_is_served_from_l1(agents_stub, app: App, tenant) -> None:
    created = await create_agent(agents_stub, tenant.md())
    await caches_trusted(app)
    hits_before = counter("agentstore_cache_hits_total", kind="agent", tier="l1")
    got = await get(agents_stub, tenant.md("reader"), created.id)
    assert got == created
    assert counter("agentstore_cache_hits_total", kind="agent", tier="l1") == hits_before + 1
    key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
    assert await app.caches["agent"].peek(key) == (1, 1)


async def test_l2_hit_when_l1_lacks_the_key(agents_stub, app: App, tenant) -> None:
    created = await create_agent(agents_stub, tenant.md())
    key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
    app.caches["agent"]._l1.drop(key)
    await caches_trusted(app)
    l2_hits = counter("agentstore_cache_hits_total", kind="agent", tier="l2")
    assert await get(agents_stub, tenant.md(), created.id) == created
    assert counter("agentstore_cache_hits_total", kind="agent", tier="l2") == l2_hits + 1


async def test_cached_entry_is_invisible_to_another_tenant(agents_stub, new_tenant) -> None:
    a, b = await new_tenant("cache-a"), await new_tenant("cache-b")
    created = await create_agent(agents_stub, a.md())
    await get(agents_stub, a.md(), created.id)  # cached for A in both tiers
    await expect_error(get(agents_stub, b.md(), created.id), grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    await expect_error(
        agents_stub.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=[created.id]), metadata=b.md()),
        grpc.StatusCode.NOT_FOUND,
        "AGENT_NOT_FOUND",
    )


async def test_no_cache_metadata_reads_postgresql(agents_stub, tenant) -> None:
    created = await create_agent(agents_stub, tenant.md())
    loads = counter("agentstore_db_loads_total", kind="agent")
    for _ in range(3):
        assert await get(agents_stub, tenant.md() + NO_CACHE, created.id) == created
    assert counter("agentstore_db_loads_total", kind="agent") == loads + 3


async def test_single_flight_one_query_for_100_concurrent_cold_gets(agents_stub, app: App, tenant) -> None:
    created = await create_agent(agents_stub, tenant.md())
    await get(agents_stub, tenant.md(), created.id)  # warm the key cache of the principal
    await app.caches["agent"].forget((uuid.UUID(tenant.tenant.id), uuid.UUID(created.id)))
    loads = counter("agentstore_db_loads_total", kind="agent")
    results = await asyncio.gather(*(get(agents_stub, tenant.md(), created.id) for _ in range(100)))
    assert all(r == created for r in results)
    assert counter("agentstore_db_loads_total", kind="agent") == loads + 1


async def test_batch_get_mixes_tiers_and_keeps_request_order(agents_stub, app: App, tenant) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(4)]
    cache = app.caches["agent"]
    tenant_id = uuid.UUID(tenant.tenant.id)
    cache._l1.drop((tenant_id, uuid.UUID(agents[1].id)))  # L2 only
    await cache.forget((tenant_id, uuid.UUID(agents[2].id)))  # nowhere: PostgreSQL
    order = [agents[2].id, agents[0].id, agents[3].id, agents[1].id, agents[0].id]
    response = await agents_stub.BatchGetAgents(
        agent_service_pb2.BatchGetAgentsRequest(ids=order), metadata=tenant.md()
    )
    assert [a.id for a in response.agents] == order
    by_id = {a.id: a for a in agents}
    assert list(response.agents) == [by_id[i] for i in order]


async def test_batch_get_fills_every_miss_and_refuses_a_stale_one(agents_stub, app: App, tenant) -> None:
    """BatchGetAgents fills the keys it loaded in one Redis round trip, each set-if-newer on its
    own: a key written between the batch's read and its fill keeps the newer version."""
    md = tenant.md()
    agents = [await create_agent(agents_stub, md) for _ in range(3)]
    cache = app.caches["agent"]
    keys = [(uuid.UUID(tenant.tenant.id), uuid.UUID(a.id)) for a in agents]
    for key in keys:
        await cache.forget(key)
    with HeldFills(cache) as held:
        batch = asyncio.ensure_future(
            agents_stub.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=[a.id for a in agents]), metadata=md)
        )
        await held.read_done()
        updated = await rename(agents_stub, md, agents[1].id)
        held.release()
        assert list((await batch).agents) == agents  # read before the commit: fine to answer v1
    assert [await cache.peek(k) for k in keys] == [(1, 1), (version_of(updated),) * 2, (1, 1)]
    assert await get(agents_stub, md, agents[1].id) == updated


# --- the stale-set race, forced ------------------------------------------------------------------


@pytest.fixture
async def second_app(servers: Servers, database: ScratchDatabase, redis_prefix: str) -> AsyncIterator[App]:
    other = await start_server(itc.server_settings(redis_prefix), database.app_url, servers.redis_url)
    yield other
    await other.stop(0)


async def _wait_subscribed(*apps: App) -> None:
    await caches_trusted(*apps)


@pytest.mark.parametrize("l2_enabled", [True, False], ids=["l1+l2", "l1-only"])
async def test_stale_set_race_leaves_no_stale_entry(
    servers: Servers, database: ScratchDatabase, redis_prefix: str, new_tenant, l2_enabled: bool
) -> None:
    """Reader on B reads v1 from PostgreSQL, then waits; A commits v2; then B fills its caches."""
    settings = itc.server_settings(redis_prefix, cache_l2_ttl_seconds=600 if l2_enabled else 0)
    writer = await start_server(settings, database.app_url, servers.redis_url)
    reader = await start_server(settings, database.app_url, servers.redis_url)
    try:
        await _wait_subscribed(writer, reader)
        tenant = await new_tenant("race")
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{writer.port}") as wch,
            grpc.aio.insecure_channel(f"127.0.0.1:{reader.port}") as rch,
        ):
            wstub, rstub = agent_service_pb2_grpc.AgentServiceStub(wch), agent_service_pb2_grpc.AgentServiceStub(rch)
            created = await create_agent(wstub, tenant.md())
            key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
            await reader.caches["agent"].forget(key)
            await get(rstub, tenant.md(), created.id)  # warm the reader's principal cache
            await reader.caches["agent"].forget(key)

            with HeldFills(reader.caches["agent"]) as held:
                stale_get = asyncio.create_task(get(rstub, tenant.md(), created.id))
                await held.read_done()
                updated = await rename(wstub, tenant.md(), created.id)
                # Let the invalidation reach the reader before its fill goes ahead.
                for _ in range(200):
                    reader.bus.drain()
                    entry = reader.caches["agent"]._l1.entry(key)
                    if entry is not None and entry.version >= version_of(updated):
                        break
                    await asyncio.sleep(0.01)
                held.release()
                assert version_of(await stale_get) == 1  # it read before the commit: fine to answer v1

            l1_version, l2_version = await reader.caches["agent"].peek(key)
            assert l1_version in (None, version_of(updated))
            assert l2_version in ((version_of(updated),) if l2_enabled else (None,))
            assert await get(rstub, tenant.md(), created.id) == updated
            assert await get(wstub, tenant.md(), created.id) == updated
            assert (await reader.caches["agent"].peek(key))[0] in (None, version_of(updated))
    finally:
        await writer.stop(0)
        await reader.stop(0)


async def test_fill_older_than_half_the_l2_ttl_is_dropped(
    servers: Servers, database: ScratchDatabase, redis_prefix: str, new_tenant
) -> None:
    """A reader stalls between its read (v1) and its fill for longer than the L2 TTL, so the
    writer's v2 entry has expired from Redis by then: set-if-newer has nothing to compare with,
    and only the age check keeps v1 out of both tiers."""
    settings = itc.server_settings(redis_prefix, cache_l2_ttl_seconds=0.4)
    server = await start_server(settings, database.app_url, servers.redis_url)
    try:
        tenant = await new_tenant("slow-fill")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = agent_service_pb2_grpc.AgentServiceStub(ch)
            cache = server.caches["agent"]
            created = await create_agent(stub, tenant.md())
            key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
            await get(stub, tenant.md(), created.id)  # warm the principal cache
            await cache.forget(key)
            with HeldFills(cache) as held:
                stale_get = asyncio.create_task(get(stub, tenant.md(), created.id))
                await held.read_done()
                updated = await rename(stub, tenant.md(), created.id)
                await asyncio.sleep(0.6)  # v2's L2 entry (0.4 s) is gone
                assert await cache.peek(key) == (version_of(updated), None)
                cache._l1.drop(key)  # as in a process that only ever saw the invalidation
                rejected = counter("agentstore_cache_stale_sets_rejected_total", kind="agent", tier="l2")
                held.release()
                assert version_of(await stale_get) == 1  # it read before the commit: fine to answer v1
            assert counter("agentstore_cache_stale_sets_rejected_total", kind="agent", tier="l2") == rejected + 1
            assert await cache.peek(key) == (None, None)
            assert await get(stub, tenant.md(), created.id) == updated
    finally:
        await server.stop(0)


# --- two server processes: read-your-writes across processes -------------------------------------


def _serve(database: ScratchDatabase, redis_url: str, prefix: str, port: int, **env: str) -> subprocess.Popen[bytes]:
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTSTORE_")},
        "AGENTSTORE_DATABASE_URL": database.app_url,
        "AGENTSTORE_REDIS_URL": redis_url,
        "AGENTSTORE_REDIS_KEY_PREFIX": prefix,
        "AGENTSTORE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "AGENTSTORE_ACCESS_LOG": "false",
        "AGENTSTORE_LOG_LEVEL": "WARNING",
        "AGENTSTORE_HEALTH_PROBE_INTERVAL_SECONDS": "0.2",
        **env,
    }
    agentstore = Path(sys.executable).parent / "agentstore"
    return subprocess.Popen([str(agentstore), "serve"], env=environ, stderr=subprocess.PIPE)


async def _wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("server did not become SERVING")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def two_servers(
    servers: Servers, database: ScratchDatabase, redis_prefix: str
) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    ports = (free_port(), free_port())
    procs = [_serve(database, servers.redis_url, redis_prefix, port) for port in ports]
    try:
        yield list(zip(ports, procs, strict=True))
    finally:
        for proc in procs:
            _stop(proc)


async def test_update_via_a_then_get_via_b_is_never_stale(
    two_servers: list[tuple[int, subprocess.Popen[bytes]]], new_tenant
) -> None:
    for port, proc in two_servers:
        await _wait_serving(port, proc)
    (port_a, _), (port_b, _) = two_servers
    tenant = await new_tenant("ryw")
    rng = random.Random(20261121)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as ach,
        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as bch,
    ):
        a, b = agent_service_pb2_grpc.AgentServiceStub(ach), agent_service_pb2_grpc.AgentServiceStub(bch)
        agents = [await create_agent(a, tenant.md()) for _ in range(10)]
        stale = 0
        for _ in range(1000):
            target = rng.choice(agents)
            if rng.random() < 0.8:
                await get(b, tenant.md(), target.id)  # B's L1 now likely holds the current version
            if rng.random() < 0.3:
                await get(a, tenant.md(), target.id)
            updated = await rename(a, tenant.md(), target.id)
            seen = await get(b, tenant.md(), target.id)
            if version_of(seen) < version_of(updated):
                stale += 1
        assert stale == 0, f"{stale} stale reads"


async def test_task_queue_writes_via_a_are_never_stale_via_b(
    two_servers: list[tuple[int, subprocess.Popen[bytes]]], new_tenant
) -> None:
    """Claim, renew, complete, fail and cancel on A; GetTask on B right after each must not be older."""
    for port, proc in two_servers:
        await _wait_serving(port, proc)
    (port_a, _), (port_b, _) = two_servers
    tenant = await new_tenant("ryw-tasks")
    md = tenant.md()
    rng = random.Random(20261122)
    lease = task_service_pb2.ClaimTaskRequest().lease_duration
    lease.FromSeconds(60)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as ach,
        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as bch,
    ):
        a, b = task_service_pb2_grpc.TaskServiceStub(ach), task_service_pb2_grpc.TaskServiceStub(bch)
        worker = await create_agent(agent_service_pb2_grpc.AgentServiceStub(ach), md)

        async def get_b(task_id: str) -> task_pb2.Task:
            return await b.GetTask(task_service_pb2.GetTaskRequest(id=task_id), metadata=md)

        stale = checks = 0
        for _ in range(150):
            task = await a.CreateTask(
                task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=unique("t"), max_attempts=5)), metadata=md
            )
            await get_b(task.id)  # B caches the PENDING version
            claimed = await a.ClaimTask(
                task_service_pb2.ClaimTaskRequest(agent_id=worker.id, lease_duration=lease), metadata=md
            )
            written: list[task_pb2.Task] = [claimed.task]
            if rng.random() < 0.5:
                await get_b(claimed.task.id)
                written.append(
                    await a.RenewTaskLease(
                        task_service_pb2.RenewTaskLeaseRequest(
                            task_id=claimed.task.id, lease_token=claimed.lease_token, lease_duration=lease
                        ),
                        metadata=md,
                    )
                )
            await get_b(claimed.task.id)
            end = rng.random()
            if end < 0.6:
                written.append(
                    await a.CompleteTask(
                        task_service_pb2.CompleteTaskRequest(task_id=claimed.task.id, lease_token=claimed.lease_token),
                        metadata=md,
                    )
                )
            elif end < 0.8:
                written.append(
                    await a.FailTask(
                        task_service_pb2.FailTaskRequest(
                            task_id=claimed.task.id, lease_token=claimed.lease_token, error="x", retryable=False
                        ),
                        metadata=md,
                    )
                )
            else:
                written.append(
                    await a.UpdateTask(
                        task_service_pb2.UpdateTaskRequest(
                            task=task_pb2.Task(id=claimed.task.id, status=task_pb2.TASK_STATUS_CANCELLED),
                            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
                        ),
                        metadata=md,
                    )
                )
            seen = await get_b(claimed.task.id)
            checks += 1
            if version_of(seen) < version_of(written[-1]) or seen.status != written[-1].status:
                stale += 1
        assert checks == 150 and stale == 0, f"{stale} stale reads"


async def test_get_task_is_served_from_l1_after_a_write(app: App, channel, tenant) -> None:
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    md = tenant.md()
    task = await stub.CreateTask(task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title="cached")), metadata=md)
    first = await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md)  # load and fill
    loads = counter("agentstore_db_loads_total", kind="task")
    await caches_trusted(app)
    hits = counter("agentstore_cache_hits_total", kind="task", tier="l1")
    assert await stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md) == first
    assert counter("agentstore_cache_hits_total", kind="task", tier="l1") == hits + 1
    assert counter("agentstore_db_loads_total", kind="task") == loads
    await stub.DeleteTask(task_service_pb2.DeleteTaskRequest(id=task.id), metadata=md)
    await expect_error(
        stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )
    key = (uuid.UUID(tenant.tenant.id), uuid.UUID(task.id))
    assert await app.caches["task"].peek(key) == (None, None)


# --- Redis killed mid-load, then restarted -------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), append_only=False)
    server.start()
    yield server
    server.stop(force=True)


async def test_redis_killed_mid_load_then_restarted(
    own_redis: EmbeddedRedis, database: ScratchDatabase, redis_prefix: str, new_tenant
) -> None:
    app = await start_server(itc.server_settings(redis_prefix), database.app_url, own_redis.url)
    try:
        await _wait_subscribed(app)
        tenant = await new_tenant("outage")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = agent_service_pb2_grpc.AgentServiceStub(ch)
            agents = [await create_agent(stub, tenant.md()) for _ in range(20)]
            latest = {a.id: version_of(a) for a in agents}
            failures: list[str] = []
            stale: list[str] = []
            rng = random.Random(7)

            async def load(rounds: int) -> None:
                for _ in range(rounds):
                    target = rng.choice(agents).id
                    try:
                        if rng.random() < 0.2:
                            updated = await rename(stub, tenant.md(), target)
                            latest[target] = max(latest[target], version_of(updated))
                        else:
                            floor = latest[target]
                            seen = await get(stub, tenant.md(), target)
                            if version_of(seen) < floor:
                                stale.append(target)
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc.code().name)

            await asyncio.gather(*(load(100) for _ in range(4)))
            own_redis.stop(force=True)  # SIGTERM to a server with no persistence: its data is gone
            await asyncio.gather(*(load(100) for _ in range(4)))
            assert not app.circuit.available or not app.bus.connected
            own_redis.start()
            for _ in range(300):
                if app.circuit.available and app.bus.connected:
                    break
                await asyncio.sleep(0.02)
            assert app.circuit.available and app.bus.connected
            hits = counter("agentstore_cache_hits_total", kind="agent", tier="l1") + counter(
                "agentstore_cache_hits_total", kind="agent", tier="l2"
            )
            await asyncio.gather(*(load(100) for _ in range(4)))
            hits_after = counter("agentstore_cache_hits_total", kind="agent", tier="l1") + counter(
                "agentstore_cache_hits_total", kind="agent", tier="l2"
            )
            assert failures == []
            assert stale == []
            assert hits_after - hits > 100  # most of the 320 Gets after recovery hit a cache tier again
            for agent_id, version in latest.items():
                assert version_of(await get(stub, tenant.md(), agent_id)) == version
    finally:
        await app.stop(0)
    assert counter("agentstore_redis_outages_total") >= 1


async def test_l2_keys_carry_prefix_and_tenant(agents_stub, servers: Servers, redis_prefix: str, tenant) -> None:
    created = await create_agent(agents_stub, tenant.md())
    client = redis.Redis.from_url(servers.redis_url)
    try:
        keys = [k.decode() for k in client.scan_iter(match=f"*{created.id}*", count=1000)]
    finally:
        client.close()
    assert keys == [f"{redis_prefix}c:agent:{tenant.tenant.id}:{created.id}"]


async def test_concurrent_uncached_gets_of_one_tenant_are_coalesced(
    agents_stub, tenant, database: ScratchDatabase
) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(40)]
    await get(agents_stub, tenant.md(), agents[0].id)  # the principal is cached
    loads = counter("agentstore_db_loads_total", kind="agent")
    # The first reads are held (a SELECT waits for ACCESS EXCLUSIVE), so that all forty are in
    # flight together however slowly they arrive: the rest gather into the next batches.
    owner = await asyncpg.connect(database.owner_url)
    try:
        async with owner.transaction():
            await owner.execute("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE")
            reads = asyncio.gather(*(get(agents_stub, tenant.md() + NO_CACHE, a.id) for a in agents))
            for _ in range(200):
                waiting = await owner.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'agents'::regclass AND NOT granted"
                )
                if waiting >= 2:  # both in-flight batches are held; the rest are queued behind them
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
    finally:
        await owner.close()
    assert await reads == agents
    # Forty point reads share far fewer queries.
    assert counter("agentstore_db_loads_total", kind="agent") - loads < len(agents)


async def test_a_bug_on_a_redis_path_is_internal_not_an_outage(
    agents_stub, app: App, tenant, caplog: pytest.LogCaptureFixture
) -> None:
    """Only Redis's own errors (unreachable, timeout, refused command) mean "serve from
    PostgreSQL"; anything else is a bug: INTERNAL with a traceback in the log, circuit closed."""
    created = await create_agent(agents_stub, tenant.md())
    app.caches["agent"]._l1.drop((uuid.UUID(tenant.tenant.id), uuid.UUID(created.id)))
    outages = counter("agentstore_redis_outages_total")
    l2 = app.deps.l2
    working = l2._get

    async def broken(key: str) -> bytes:
        raise TypeError("a bug, not an outage")

    l2._get = broken
    try:
        await expect_error(
            agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=tenant.md()),
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
        )
    finally:
        l2._get = working
    assert app.circuit.available
    assert counter("agentstore_redis_outages_total") == outages
    assert any(r.exc_info is not None and r.exc_info[0] is TypeError for r in caplog.records)
    assert await get(agents_stub, tenant.md(), created.id) == created
