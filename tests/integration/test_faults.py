"""Failures on the way in and on the way to PostgreSQL, against real servers.

Malformed bytes, oversized messages, deadlines and statement timeouts (with the statement
really cancelled in PostgreSQL), pool exhaustion, a database that goes away and comes back, and
the error table of agentstore.db.errors fed with real asyncpg exceptions, including a real
deadlock retried by Database.run.

There is no slow RPC, so "slow" is made by holding a row lock as the owner.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import agentstore.resources.agents  # noqa: F401  (registers agents_name_key)
from agentstore.db import Database, map_database_error
from agentstore.dsn import replace_dsn
from agentstore.errors import ApiError
from agentstore.resources import fields
from agentstore.server import App, start_server
from agentstore.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc, tenant_service_pb2_grpc
from tests.conftest import APP_ROLE, Servers, create_database, create_empty_database, drop_database
from tests.conftest import ScratchDatabase as Db
from tests.integration.conftest import TenantKeys, make_tenant
from tests.integration.conftest import server_settings as settings_for
from tests.integration.helpers import create_agent, expect_error, unique, unpack_failure

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POLL_TIMEOUT = 15.0
CALL_TIMEOUT = 15.0
Code = grpc.StatusCode


# --- helpers ----------------------------------------------------------------------------------


async def until(predicate: Callable[[], Awaitable[bool]], what: str, limit: float = POLL_TIMEOUT) -> None:
    """Poll `predicate` every 50 ms until it is true; fail after `limit` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def row_locked(owner_url: str, agent_id: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold `SELECT ... FOR UPDATE` on one agent as the owner until the block ends."""
    con = await asyncpg.connect(owner_url)
    try:
        await con.execute("BEGIN")
        locked = await con.fetchval("SELECT id FROM agents WHERE id = $1 FOR UPDATE", uuid.UUID(agent_id))
        assert locked is not None
        yield con
    finally:
        if not con.is_closed():
            if con.is_in_transaction():
                await con.execute("ROLLBACK")
            await con.close()


async def app_waiters(monitor: asyncpg.Connection, database: str) -> list[asyncpg.Record]:
    """Backends of the application role in `database` waiting on a lock or running a locking query.

    `monitor` must not be inside a transaction: pg_stat_activity is snapshotted per transaction.
    """
    return await monitor.fetch(
        """
        SELECT pid, state, wait_event_type, query FROM pg_stat_activity
        WHERE datname = $1 AND usename = $2
          AND (wait_event_type = 'Lock'
               OR (state = 'active' AND (query ILIKE '%FOR UPDATE%' OR query ILIKE 'UPDATE agents%')))
        """,
        database,
        APP_ROLE,
    )


async def wait_until_blocked(monitor: asyncpg.Connection, database: str) -> None:
    async def blocked() -> bool:
        return any(r["wait_event_type"] == "Lock" for r in await app_waiters(monitor, database))

    await until(blocked, "the application role to wait on the row lock")


async def wait_until_nothing_waits(monitor: asyncpg.Connection, database: str) -> None:
    async def clear() -> bool:
        return not await app_waiters(monitor, database)

    await until(clear, "PostgreSQL to cancel the application role's statement")


def update_request(agent: agent_pb2.Agent, role: str = "busy") -> agent_service_pb2.UpdateAgentRequest:
    request = agent_service_pb2.UpdateAgentRequest(agent=agent_pb2.Agent(id=agent.id, role=role))
    request.update_mask.paths.append("role")
    return request


def by_name(agent: agent_pb2.Agent) -> agent_service_pb2.ListAgentsRequest:
    """A ListAgents request for one agent: lists always read PostgreSQL."""
    return agent_service_pb2.ListAgentsRequest(filter=f'name = "{agent.name}"')


def uncached_get() -> agent_service_pb2.GetAgentRequest:
    """A GetAgent no cache can answer: an id never read or written before."""
    return agent_service_pb2.GetAgentRequest(id=str(uuid.uuid4()))


async def health_of(address: str, service: str = "") -> int | None:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError:
            return None
        return int(response.status)


@pytest.fixture
async def extra_servers(servers: Servers, database: Db, redis_prefix: str) -> AsyncIterator[Any]:
    """Starts servers with setting overrides on the session database; stops them at the end."""
    started: list[App] = []

    async def start(**overrides: object) -> App:
        app = await start_server(settings_for(redis_prefix, **overrides), database.app_url, servers.redis_url)
        started.append(app)
        return app

    yield start
    for app in reversed(started):
        await app.stop(0)


@pytest.fixture
async def monitor(database: Db) -> AsyncIterator[asyncpg.Connection]:
    con = await asyncpg.connect(database.owner_url)
    try:
        yield con
    finally:
        await con.close()


# --- malformed and oversized requests ---------------------------------------------------------


async def test_malformed_request_bytes(channel: grpc.aio.Channel, agents_stub, tenant: TenantKeys) -> None:
    raw = channel.unary_unary(
        "/agentstore.v1.AgentService/GetAgent",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    failure = await expect_error(
        raw(b"\xff\xff\xff", metadata=tenant.md("reader"), timeout=CALL_TIMEOUT),
        Code.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
    )
    assert failure.trailer("x-request-id")
    # Without a key too: the bytes are judged before anything else.
    await expect_error(raw(b"\xff\xff\xff", timeout=CALL_TIMEOUT), Code.INVALID_ARGUMENT, "MALFORMED_REQUEST")

    created = await create_agent(agents_stub, tenant.md())
    got = await agents_stub.GetAgent(
        agent_service_pb2.GetAgentRequest(id=created.id), metadata=tenant.md("reader"), timeout=CALL_TIMEOUT
    )
    assert got == created
    # The raw channel works with valid bytes as well.
    ok = await raw(
        agent_service_pb2.GetAgentRequest(id=created.id).SerializeToString(),
        metadata=tenant.md("reader"),
        timeout=CALL_TIMEOUT,
    )
    assert agent_pb2.Agent.FromString(ok) == created


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28"], ids=["not-protobuf", "bad-utf8"])
async def test_malformed_bytes_to_health_and_reflection(
    channel: grpc.aio.Channel, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Health and reflection need no key, but bytes that do not parse still get INVALID_ARGUMENT
    (not UNKNOWN), and the server logs no traceback for them."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await check(garbage, timeout=CALL_TIMEOUT)
    assert raised.value.code() == Code.INVALID_ARGUMENT

    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in watch(garbage, timeout=CALL_TIMEOUT):
            pass
    assert raised.value.code() == Code.INVALID_ARGUMENT

    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    call = reflect(iter([garbage]), timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == Code.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]

    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)).status == SERVING


async def test_message_too_large(extra_servers, tenant: TenantKeys) -> None:
    app = await extra_servers(max_receive_message_bytes=1024)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        big = agent_pb2.Agent(name=unique("big"))
        big.metadata.update({"blob": "x" * 4096})
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateAgent(
                agent_service_pb2.CreateAgentRequest(agent=big), metadata=tenant.md(), timeout=CALL_TIMEOUT
            )
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED, caught.value.details()

        small = await stub.CreateAgent(
            agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=unique("small"))),
            metadata=tenant.md(),
            timeout=CALL_TIMEOUT,
        )
        assert small.id


def wide_struct(keys: int) -> struct_pb2.Struct:
    wide = struct_pb2.Struct()
    wide.update({f"key-{i}": i for i in range(keys)})
    return wide


async def test_oversized_structs_are_refused_before_they_are_converted(
    channel: grpc.aio.Channel, agents_stub, tenant: TenantKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Struct of 150,000 keys (3 MB) cost a quarter second of server CPU in MessageToDict before
    its INVALID_ARGUMENT. Now: a request over the per-RPC limit is refused before it is parsed, and
    a Struct over the JSON limit by its wire size, before any conversion; health keeps answering."""
    conversions = []
    real = fields.json_format.MessageToDict
    monkeypatch.setattr(fields.json_format, "MessageToDict", lambda m, **kw: conversions.append(m) or real(m, **kw))

    def create(metadata: struct_pb2.Struct) -> Any:
        agent = agent_pb2.Agent(name=unique("wide"), metadata=metadata)
        return agents_stub.CreateAgent(
            agent_service_pb2.CreateAgentRequest(agent=agent), metadata=tenant.md(), timeout=CALL_TIMEOUT
        )

    huge = wide_struct(150_000)
    assert huge.ByteSize() > 2 * 1024 * 1024
    health = health_pb2_grpc.HealthStub(channel)
    outcomes = await asyncio.gather(
        *(create(huge) for _ in range(9)),
        health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT),
        return_exceptions=True,
    )
    for failure in outcomes[:9]:
        assert isinstance(failure, grpc.aio.AioRpcError)
        info = unpack_failure(failure)
        assert (info.code, info.info.reason) == (Code.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE")
    assert isinstance(outcomes[9], health_pb2.HealthCheckResponse) and outcomes[9].status == SERVING

    await expect_error(create(wide_struct(20_000)), Code.INVALID_ARGUMENT, "INVALID_FIELD", field="agent.metadata")
    assert conversions == []  # neither was ever turned into a dict
    assert (await create(wide_struct(10))).id


# --- deadlines and statement timeouts ---------------------------------------------------------


async def test_deadline_cancels_the_statement(
    extra_servers, tenant: TenantKeys, database: Db, monitor: asyncpg.Connection
) -> None:
    # A statement timeout far beyond every wait below: only the call's deadline can end the statement.
    app = await extra_servers(db_statement_timeout_seconds=120)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    agents_stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    try:
        await _deadline_cancels_the_statement(agents_stub, tenant, database, monitor)
    finally:
        await channel.close()


async def _deadline_cancels_the_statement(
    agents_stub: agent_service_pb2_grpc.AgentServiceStub,
    tenant: TenantKeys,
    database: Db,
    monitor: asyncpg.Connection,
) -> None:
    agent = await create_agent(agents_stub, tenant.md())
    async with row_locked(database.owner_url, agent.id):
        # The client's own deadline ends the call; no ErrorInfo is guaranteed then.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agents_stub.UpdateAgent(update_request(agent), metadata=tenant.md(), timeout=0.5)
        assert caught.value.code() == Code.DEADLINE_EXCEEDED
        # The lock is still held: only a cancelled statement explains an empty wait list.
        await asyncio.sleep(1.0)
        await wait_until_nothing_waits(monitor, database.name)

    # The agent was not changed (asked of PostgreSQL, not of a cache), and the server still serves.
    row = await monitor.fetchrow("SELECT role, version FROM agents WHERE id = $1", uuid.UUID(agent.id))
    assert (row["role"], row["version"]) == (agent.role, 1)
    listed = await agents_stub.ListAgents(by_name(agent), metadata=tenant.md("reader"), timeout=CALL_TIMEOUT)
    assert list(listed.agents) == [agent]


async def test_statement_timeout_without_client_deadline(
    extra_servers, tenant: TenantKeys, database: Db, monitor: asyncpg.Connection
) -> None:
    app = await extra_servers(db_statement_timeout_seconds=0.3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        agent = await create_agent(stub, tenant.md())
        async with row_locked(database.owner_url, agent.id):
            failure = await expect_error(
                stub.UpdateAgent(update_request(agent), metadata=tenant.md()),
                Code.DEADLINE_EXCEEDED,
                "DEADLINE_EXCEEDED",
            )
            assert "SELECT" not in failure.message and "agents" not in failure.message
            await wait_until_nothing_waits(monitor, database.name)
        updated = await stub.UpdateAgent(update_request(agent), metadata=tenant.md(), timeout=CALL_TIMEOUT)
        assert updated.role == "busy"


# --- pool exhaustion --------------------------------------------------------------------------


async def test_pool_exhausted(extra_servers, tenant: TenantKeys, database: Db, monitor: asyncpg.Connection) -> None:
    app = await extra_servers(
        db_pool_max_size=1,
        db_pool_min_size=1,
        db_pool_acquire_timeout_seconds=0.2,
        auth_cache_ttl_seconds=60,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        agent = await create_agent(stub, tenant.md())
        # Warms the auth cache for the writer key, so the calls below need no connection to authenticate.
        await stub.ListAgents(by_name(agent), metadata=tenant.md(), timeout=CALL_TIMEOUT)

        async with row_locked(database.owner_url, agent.id):
            update = asyncio.ensure_future(stub.UpdateAgent(update_request(agent), metadata=tenant.md()))
            try:
                await wait_until_blocked(monitor, database.name)
                # Only calls that need PostgreSQL: an agent never read before, and a list.
                await expect_error(
                    stub.GetAgent(uncached_get(), metadata=tenant.md(), timeout=CALL_TIMEOUT),
                    Code.RESOURCE_EXHAUSTED,
                    "POOL_EXHAUSTED",
                )
                await expect_error(
                    stub.ListAgents(by_name(agent), metadata=tenant.md(), timeout=CALL_TIMEOUT),
                    Code.RESOURCE_EXHAUSTED,
                    "POOL_EXHAUSTED",
                )
            except BaseException:
                update.cancel()
                raise
        # The lock is gone: the blocked update finishes normally.
        updated = await asyncio.wait_for(update, timeout=CALL_TIMEOUT)
        assert updated.role == "busy"
        listed = await stub.ListAgents(by_name(agent), metadata=tenant.md(), timeout=CALL_TIMEOUT)
        assert list(listed.agents) == [updated]


# --- the database goes away -------------------------------------------------------------------


@dataclass
class Killable:
    db: Db
    app: App
    address: str
    stub: agent_service_pb2_grpc.AgentServiceStub
    keys: TenantKeys
    agent: agent_pb2.Agent


@pytest.fixture
async def killable(servers: Servers, redis_prefix: str) -> AsyncIterator[Killable]:
    """A server on a scratch database of its own, with a tenant, keys and one agent."""
    name = f"agentstore_faults_{uuid.uuid4().hex[:12]}"
    db = await create_database(servers.admin_url, name)
    app: App | None = None
    try:
        app = await start_server(
            settings_for(redis_prefix, health_probe_interval_seconds=0.2), db.app_url, servers.redis_url
        )
        address = f"127.0.0.1:{app.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            keys = await make_tenant(tenant_service_pb2_grpc.TenantServiceStub(channel), unique("killable"))
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            agent = await create_agent(stub, keys.md())
            yield Killable(db, app, address, stub, keys, agent)
    finally:
        admin = await asyncpg.connect(servers.admin_url)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        finally:
            await admin.close()
        if app is not None:
            await app.stop(0)
        await drop_database(servers.admin_url, name)


async def terminate_app_backends(admin_url: str, database: str) -> int:
    con = await asyncpg.connect(admin_url)
    try:
        return int(
            await con.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
                database,
                APP_ROLE,
            )
        )
    finally:
        await con.close()


async def set_allow_connections(admin_url: str, database: str, allow: bool) -> None:
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"true" if allow else "false"}')
    finally:
        await con.close()


async def outcome(call: Awaitable[Any]) -> tuple[Code, str]:
    """(code, ErrorInfo reason) of a call; (OK, "") when it succeeded."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        try:
            failure = unpack_failure(exc)
        except AssertionError:
            return exc.code(), f"<no ErrorInfo: {exc.details()}>"
        return failure.code, failure.info.reason
    return Code.OK, ""


async def test_backend_terminated_mid_call(servers: Servers, killable: Killable) -> None:
    k = killable
    monitor = await asyncpg.connect(k.db.owner_url)
    try:
        async with row_locked(k.db.owner_url, k.agent.id):
            update = asyncio.ensure_future(
                k.stub.UpdateAgent(update_request(k.agent), metadata=k.keys.md(), timeout=CALL_TIMEOUT)
            )
            try:
                await wait_until_blocked(monitor, k.db.name)
                assert await terminate_app_backends(servers.admin_url, k.db.name) >= 1
                code, reason = await asyncio.wait_for(outcome(update), timeout=CALL_TIMEOUT)
            finally:
                update.cancel()
        assert (code, reason) == (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    finally:
        await monitor.close()

    # Idle pooled connections were terminated too; whatever the next calls meet, it is never
    # UNKNOWN or INTERNAL, and the pool recovers by itself.
    assert await terminate_app_backends(servers.admin_url, k.db.name) >= 0
    results = []
    for _ in range(5):
        results.append(await outcome(k.stub.ListAgents(by_name(k.agent), metadata=k.keys.md(), timeout=CALL_TIMEOUT)))
    assert all(r in ((Code.OK, ""), (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")) for r in results), results
    assert results[-1] == (Code.OK, ""), results


async def test_terminations_racing_calls_are_unavailable(servers: Servers, killable: Killable) -> None:
    """Backends terminated just as calls start on them (a failover, an operator's
    pg_terminate_backend): every call either succeeds or is UNAVAILABLE, never INTERNAL."""
    k = killable
    admin = await asyncpg.connect(servers.admin_url)
    results: dict[tuple[Code, str], int] = {}
    try:
        for _ in range(40):
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
                k.db.name,
                APP_ROLE,
            )
            # A list always reaches PostgreSQL (a GetAgent could be a cache hit).
            result = await outcome(k.stub.ListAgents(by_name(k.agent), metadata=k.keys.md(), timeout=CALL_TIMEOUT))
            results[result] = results.get(result, 0) + 1
    finally:
        await admin.close()
    allowed = {(Code.OK, ""), (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")}
    assert set(results) <= allowed, results


async def test_unreachable_database_is_unavailable(servers: Servers, killable: Killable) -> None:
    k = killable
    await set_allow_connections(servers.admin_url, k.db.name, False)
    await terminate_app_backends(servers.admin_url, k.db.name)

    md = k.keys.md()
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "GetAgent": lambda: k.stub.GetAgent(uncached_get(), metadata=md, timeout=CALL_TIMEOUT),
        "BatchGetAgents": lambda: k.stub.BatchGetAgents(
            agent_service_pb2.BatchGetAgentsRequest(ids=[str(uuid.uuid4())]), metadata=md, timeout=CALL_TIMEOUT
        ),
        "ListAgents": lambda: k.stub.ListAgents(
            agent_service_pb2.ListAgentsRequest(), metadata=md, timeout=CALL_TIMEOUT
        ),
        "CreateAgent": lambda: create_agent(k.stub, md),
        "UpdateAgent": lambda: k.stub.UpdateAgent(update_request(k.agent), metadata=md, timeout=CALL_TIMEOUT),
        "DeleteAgent": lambda: k.stub.DeleteAgent(
            agent_service_pb2.DeleteAgentRequest(id=k.agent.id), metadata=md, timeout=CALL_TIMEOUT
        ),
    }
    results = {name: await outcome(call()) for name, call in calls.items()}
    assert all(r == (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE") for r in results.values()), results
    # The agent written before the outage may be answered from a cache; if not, UNAVAILABLE.
    cached = await outcome(
        k.stub.GetAgent(agent_service_pb2.GetAgentRequest(id=k.agent.id), metadata=md, timeout=CALL_TIMEOUT)
    )
    assert cached in ((Code.OK, ""), (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")), cached


async def test_health_follows_the_database(servers: Servers, killable: Killable) -> None:
    k = killable
    assert await health_of(k.address) == SERVING
    await set_allow_connections(servers.admin_url, k.db.name, False)
    await terminate_app_backends(servers.admin_url, k.db.name)

    async def not_serving() -> bool:
        return await health_of(k.address) == NOT_SERVING

    await until(not_serving, "health to go NOT_SERVING")
    for service in ("readiness", "agentstore.v1.AgentService"):
        assert await health_of(k.address, service) == NOT_SERVING
    # Liveness is about the process, not its dependencies.
    assert await health_of(k.address, "liveness") == SERVING

    await set_allow_connections(servers.admin_url, k.db.name, True)

    async def serving() -> bool:
        return await health_of(k.address) == SERVING

    await until(serving, "health to return to SERVING")
    listed = await k.stub.ListAgents(by_name(k.agent), metadata=k.keys.md(), timeout=CALL_TIMEOUT)
    assert list(listed.agents) == [k.agent]
    created = await create_agent(k.stub, k.keys.md())
    assert created.id


# --- the error table with real exceptions -----------------------------------------------------


@pytest.fixture(scope="module")
async def plain(servers: Servers) -> AsyncIterator[str]:
    """An unmigrated scratch database with a few tables; yields its owner (superuser) URL."""
    name = f"agentstore_errors_{uuid.uuid4().hex[:12]}"
    url = await create_empty_database(servers.admin_url, name)
    con = await asyncpg.connect(url)
    try:
        await con.execute(
            """
            CREATE TABLE parents (id int PRIMARY KEY);
            CREATE TABLE children (
                id int PRIMARY KEY,
                parent_id int REFERENCES parents (id),
                size int NOT NULL CHECK (size >= 0),
                name text,
                CONSTRAINT agents_name_key UNIQUE (name)
            );
            CREATE TABLE bookings (during int4range, EXCLUDE USING gist (during WITH &&));
            CREATE TABLE counters (id int PRIMARY KEY, v int NOT NULL);
            INSERT INTO parents VALUES (1);
            INSERT INTO counters VALUES (1, 0), (2, 0);
            """
        )
    finally:
        await con.close()
    yield url
    await drop_database(servers.admin_url, name)


async def raised(call: Awaitable[Any]) -> BaseException:
    try:
        await call
    except BaseException as exc:
        return exc
    raise AssertionError("expected the call to fail")


def check_mapping(exc: BaseException, code: Code, reason: str) -> ApiError:
    mapped = map_database_error(exc)
    assert mapped is not None, f"{type(exc).__name__} is not mapped"
    assert (mapped.code, mapped.reason) == (code, reason), (type(exc).__name__, mapped)
    # Nothing of the server's text reaches the client.
    server_text = str(exc)
    assert not server_text or server_text not in mapped.message
    return mapped


async def test_map_constraint_and_data_errors(plain: str) -> None:
    con = await asyncpg.connect(plain)
    try:
        await con.execute("INSERT INTO children VALUES (1, 1, 0, 'a')")

        exc = await raised(con.execute("INSERT INTO children VALUES (1, 1, 0, 'b')"))
        assert isinstance(exc, asyncpg.UniqueViolationError)
        check_mapping(exc, Code.ALREADY_EXISTS, "ALREADY_EXISTS")

        # A registered constraint name gets its resource's own reason and field violation.
        exc = await raised(con.execute("INSERT INTO children VALUES (2, 1, 0, 'a')"))
        assert isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name == "agents_name_key"
        mapped = check_mapping(exc, Code.ALREADY_EXISTS, "AGENT_NAME_TAKEN")
        assert [v.field for v in mapped.violations] == ["agent.name"]

        exc = await raised(con.execute("INSERT INTO children VALUES (3, 99, 0, 'c')"))
        assert isinstance(exc, asyncpg.ForeignKeyViolationError)
        check_mapping(exc, Code.FAILED_PRECONDITION, "REFERENCED_RESOURCE_MISSING")

        exc = await raised(con.execute("INSERT INTO children VALUES (4, 1, -1, 'd')"))
        assert isinstance(exc, asyncpg.CheckViolationError)
        check_mapping(exc, Code.INVALID_ARGUMENT, "INVALID_FIELD")

        exc = await raised(con.execute("INSERT INTO children VALUES (5, 1, NULL, 'e')"))
        assert isinstance(exc, asyncpg.NotNullViolationError)
        check_mapping(exc, Code.INVALID_ARGUMENT, "INVALID_FIELD")

        await con.execute("INSERT INTO bookings VALUES ('[1,10)')")
        exc = await raised(con.execute("INSERT INTO bookings VALUES ('[5,15)')"))
        assert isinstance(exc, asyncpg.ExclusionViolationError)
        check_mapping(exc, Code.FAILED_PRECONDITION, "CONFLICT")

        exc = await raised(con.fetchval("SELECT 1/0"))
        assert isinstance(exc, asyncpg.DataError)
        check_mapping(exc, Code.INVALID_ARGUMENT, "INVALID_VALUE")

        exc = await raised(con.fetchval("SELECT $1::text", "nul\x00byte"))
        assert isinstance(exc, asyncpg.DataError)
        check_mapping(exc, Code.INVALID_ARGUMENT, "INVALID_VALUE")

        exc = await raised(con.execute("SET statement_timeout = 50; SELECT pg_sleep(5)"))
        assert isinstance(exc, asyncpg.QueryCanceledError)
        check_mapping(exc, Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
        await con.execute("RESET statement_timeout")

        # A programming error is not a database failure: it is left for INTERNAL.
        exc = await raised(con.execute("SELEC 1"))
        assert isinstance(exc, asyncpg.PostgresSyntaxError)
        assert map_database_error(exc) is None
        assert map_database_error(ValueError("x")) is None
    finally:
        await con.close()


async def test_map_insufficient_privilege(database: Db) -> None:
    con = await asyncpg.connect(database.app_url)
    try:
        exc = await raised(con.execute("DELETE FROM audit_logs"))
        assert isinstance(exc, asyncpg.InsufficientPrivilegeError)
        check_mapping(exc, Code.PERMISSION_DENIED, "DATABASE_PRIVILEGE")
    finally:
        await con.close()


async def test_map_serialization_failure(plain: str) -> None:
    first = await asyncpg.connect(plain)
    second = await asyncpg.connect(plain)
    try:
        await first.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await first.fetchval("SELECT v FROM counters WHERE id = 1")
        await second.execute("UPDATE counters SET v = v + 1 WHERE id = 1")
        exc = await raised(first.execute("UPDATE counters SET v = v + 1 WHERE id = 1"))
        assert isinstance(exc, asyncpg.SerializationError)
        check_mapping(exc, Code.ABORTED, "CONCURRENT_MODIFICATION")
        await first.execute("ROLLBACK")
    finally:
        await first.close()
        await second.close()


async def test_map_connection_errors(servers: Servers, plain: str) -> None:
    # Nothing listens on this port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exc = await raised(asyncpg.connect(host="127.0.0.1", port=port, user="postgres", timeout=5))
    assert isinstance(exc, OSError)
    check_mapping(exc, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")

    # A backend terminated under an open connection.
    victim = await asyncpg.connect(plain)
    killer = await asyncpg.connect(plain)
    try:
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", victim.get_server_pid())

        async def noticed() -> bool:
            return victim.is_closed()

        # Once the client has seen the FATAL message (a query racing it: see
        # test_terminations_racing_calls_are_unavailable).
        await until(noticed, "the client to notice the terminated backend")
        exc = await raised(victim.fetchval("SELECT 1"))
        assert isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError, asyncpg.InterfaceError))
        check_mapping(exc, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    finally:
        victim.terminate()
        await killer.close()

    # A connection closed on this side.
    closed = await asyncpg.connect(plain)
    await closed.close()
    exc = await raised(closed.fetchval("SELECT 1"))
    assert isinstance(exc, asyncpg.InterfaceError)
    check_mapping(exc, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")

    # Too many connections for a role (SQLSTATE 53300).
    role = f"agentstore_limited_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(servers.admin_url)
    try:
        # With a password: the embedded server asks every role but the superuser for one.
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'limited' CONNECTION LIMIT 0")
        exc = await raised(asyncpg.connect(replace_dsn(plain, user=role, password="limited"), timeout=5))
        assert isinstance(exc, asyncpg.TooManyConnectionsError)
        check_mapping(exc, Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()

    # Failures that cannot be produced on demand here, built directly.
    for cls in (asyncpg.CannotConnectNowError, asyncpg.CrashShutdownError, asyncpg.AdminShutdownError):
        check_mapping(cls("the server said something"), Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    check_mapping(ConnectionResetError("reset"), Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")


async def test_database_not_accepting_connections_is_unavailable(servers: Servers, redis_prefix: str) -> None:
    """`ALLOW_CONNECTIONS false` fails new connections with SQLSTATE 55000, which is not a
    connection class: Database.run must still answer UNAVAILABLE, not let it through as INTERNAL."""
    name = f"agentstore_closed_{uuid.uuid4().hex[:12]}"
    url = replace_dsn(servers.admin_url, database=name)
    admin = await asyncpg.connect(servers.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" ALLOW_CONNECTIONS false')
        exc = await raised(asyncpg.connect(url, timeout=5))
        assert isinstance(exc, asyncpg.ObjectNotInPrerequisiteStateError), type(exc)

        db = Database(settings_for(redis_prefix, db_pool_min_size=0, db_pool_max_size=1), url)
        await db.open()
        try:
            with pytest.raises(ApiError) as caught:
                await db.run(lambda con: con.fetchval("SELECT 1"), None)
            assert (caught.value.code, caught.value.reason) == (Code.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        finally:
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()


# --- a real deadlock, retried by Database.run ---------------------------------------------------


class DeadlockRig:
    """Makes the unit of work deadlock against a helper connection, every time or once.

    The work locks counters row 1; the helper (deadlock_timeout 30 s) locks row 2 and then waits
    for row 1; the work (deadlock_timeout 50 ms) then asks for row 2, detects the cycle first and
    is the one that gets DeadlockDetectedError.
    """

    def __init__(self, helper: asyncpg.Connection, monitor: asyncpg.Connection, deadlocks: int) -> None:
        self.helper = helper
        self.monitor = monitor
        self.deadlocks = deadlocks
        self.attempts = 0
        self.errors: list[BaseException] = []
        self._blocked: asyncio.Task[str] | None = None

    async def settle(self) -> None:
        """Let the helper finish its blocked update (the work's transaction is gone) and roll back."""
        if self._blocked is not None:
            blocked, self._blocked = self._blocked, None
            await asyncio.wait_for(blocked, timeout=POLL_TIMEOUT)
        if self.helper.is_in_transaction():
            await self.helper.execute("ROLLBACK")

    async def work(self, con: asyncpg.Connection) -> str:
        self.attempts += 1
        await self.settle()
        await con.execute("SET LOCAL deadlock_timeout = '50ms'")
        await con.execute("UPDATE counters SET v = v + 1 WHERE id = 1")
        if self.attempts > self.deadlocks:
            await con.execute("UPDATE counters SET v = v + 1 WHERE id = 2")
            return f"done on attempt {self.attempts}"
        await self.helper.execute("BEGIN")
        await self.helper.execute("UPDATE counters SET v = v + 1 WHERE id = 2")
        self._blocked = asyncio.create_task(self.helper.execute("UPDATE counters SET v = v + 1 WHERE id = 1"))
        pid = self.helper.get_server_pid()

        async def helper_waits() -> bool:
            state = await self.monitor.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
            return state == "Lock"

        await until(helper_waits, "the helper to wait on row 1")
        try:
            await con.execute("UPDATE counters SET v = v + 1 WHERE id = 2")
        except BaseException as exc:
            self.errors.append(exc)
            raise
        raise AssertionError("the work was expected to deadlock")


@pytest.fixture
async def deadlock_parts(plain: str, redis_prefix: str) -> AsyncIterator[tuple[Database, Callable[[int], DeadlockRig]]]:
    helper = await asyncpg.connect(plain)
    monitor = await asyncpg.connect(plain)
    await helper.execute("SET deadlock_timeout = '30s'")
    db = Database(settings_for(redis_prefix, db_max_retries=1, db_pool_min_size=1, db_pool_max_size=2), plain)
    await db.open()
    rigs: list[DeadlockRig] = []

    def rig(deadlocks: int) -> DeadlockRig:
        made = DeadlockRig(helper, monitor, deadlocks)
        rigs.append(made)
        return made

    try:
        yield db, rig
    finally:
        for made in rigs:
            try:
                await made.settle()
            except Exception:
                helper.terminate()
                break
        await db.close()
        if not helper.is_closed():
            await helper.close()
        await monitor.close()


async def test_deadlock_every_time_is_retried_then_aborted(deadlock_parts) -> None:
    db, rig = deadlock_parts
    every_time = rig(deadlocks=100)
    with pytest.raises(ApiError) as caught:
        await db.run(every_time.work, None)
    assert (caught.value.code, caught.value.reason) == (Code.ABORTED, "CONCURRENT_MODIFICATION")
    # db_max_retries=1: the first attempt and one retry, both deadlocked.
    assert every_time.attempts == 2
    assert len(every_time.errors) == 2
    assert all(isinstance(e, asyncpg.DeadlockDetectedError) for e in every_time.errors)
    check_mapping(every_time.errors[0], Code.ABORTED, "CONCURRENT_MODIFICATION")


async def test_deadlock_once_is_retried_and_succeeds(deadlock_parts) -> None:
    db, rig = deadlock_parts
    once = rig(deadlocks=1)
    assert await db.run(once.work, None) == "done on attempt 2"
    assert once.attempts == 2
    assert [type(e) for e in once.errors] == [asyncpg.DeadlockDetectedError]
