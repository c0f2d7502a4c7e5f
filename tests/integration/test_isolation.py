"""Tenant isolation: through the API on a server with one pooled connection, and in the database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentstore.server import App, start_server
from agentstore.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc
from tests.integration.conftest import TenantKeys
from tests.integration.conftest import server_settings as settings_for  # not collected as a test
from tests.integration.helpers import create_agent, expect_error, list_all

if TYPE_CHECKING:
    from tests.conftest import ScratchDatabase, Servers

S = grpc.StatusCode
TENANT_TABLES = ("agents", "api_keys", "audit_logs", "tenants", "create_requests")


@pytest.fixture(scope="module")
async def solo_app(servers: Servers, database: ScratchDatabase, redis_prefix: str) -> AsyncIterator[App]:
    """A second server whose whole pool is one connection, shared by every tenant's requests."""
    settings = settings_for(redis_prefix, db_pool_min_size=1, db_pool_max_size=1, auth_cache_ttl_seconds=0)
    app = await start_server(settings, database.app_url, servers.redis_url)
    try:
        yield app
    finally:
        await app.stop(0)


@pytest.fixture(scope="module")
async def solo(solo_app: App) -> AsyncIterator[agent_service_pb2_grpc.AgentServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{solo_app.port}") as channel:
        yield agent_service_pb2_grpc.AgentServiceStub(channel)


@dataclass
class Side:
    keys: TenantKeys
    agents: list[agent_pb2.Agent]

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self.keys.md()

    @property
    def ids(self) -> set[str]:
        return {a.id for a in self.agents}


@pytest.fixture(scope="module")
async def sides(solo, new_tenant) -> tuple[Side, Side]:
    a = Side(await new_tenant("iso-a"), [])
    b = Side(await new_tenant("iso-b"), [])
    # Interleaved creates, with the same names on both sides.
    for i in range(6):
        for side in (a, b):
            side.agents.append(
                await create_agent(
                    solo,
                    side.md,
                    f"shared-{i}",
                    role=f"role-{i % 2}",
                    capabilities=["python"],
                    metadata={"region": "eu"},
                    request_id=str(uuid.uuid4()),
                )
            )
    return a, b


def get(stub: Any, md: Any, agent_id: str) -> Any:
    return stub.GetAgent(agent_service_pb2.GetAgentRequest(id=agent_id), metadata=md)


async def test_alternating_requests_on_one_connection(solo, sides: tuple[Side, Side]) -> None:
    a, b = sides
    for round_ in range(25):
        for me, other in ((a, b), (b, a)) if round_ % 2 == 0 else ((b, a), (a, b)):
            listed = await list_all(solo, me.md, page_size=4)
            assert {x.id for x in listed} == me.ids
            mine = me.agents[round_ % len(me.agents)]
            assert await get(solo, me.md, mine.id) == mine
            theirs = other.agents[round_ % len(other.agents)]
            await expect_error(get(solo, me.md, theirs.id), S.NOT_FOUND, "AGENT_NOT_FOUND")
            filtered = await list_all(solo, me.md, filter=f'name = "{theirs.name}" AND capabilities:python')
            assert [x.id for x in filtered] == [mine.id for mine in me.agents if mine.name == theirs.name]


async def test_concurrent_mixed_tenant_calls(solo, sides: tuple[Side, Side]) -> None:
    a, b = sides

    async def list_ids(side: Side, **kwargs: Any) -> set[str]:
        return {x.id for x in await list_all(solo, side.md, **kwargs)}

    async def batch(side: Side, wanted: list[str]) -> list[str]:
        response = await solo.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=wanted), metadata=side.md)
        return [x.id for x in response.agents]

    for round_ in range(10):
        calls: list[tuple[str, Any, Any]] = []
        for me, other in ((a, b), (b, a)):
            own = [x.id for x in me.agents]
            foreign = other.agents[round_ % len(other.agents)].id
            calls += [
                ("ids", list_ids(me), me.ids),
                (
                    "ids",
                    list_ids(me, filter="role = role-0", page_size=1),
                    {x.id for x in me.agents if x.role == "role-0"},
                ),
                ("batch", batch(me, own[::-1]), own[::-1]),
                ("get", get(solo, me.md, own[round_ % len(own)]), own[round_ % len(own)]),
                ("missing", get(solo, me.md, foreign), None),
                ("missing", batch(me, [own[0], foreign]), None),
            ]
        results = await asyncio.gather(*(c for _, c, _ in calls), return_exceptions=True)
        for (kind, _, expected), result in zip(calls, results, strict=True):
            if kind == "missing":
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert result.code() == S.NOT_FOUND, result
            elif kind == "get":
                assert not isinstance(result, BaseException), result
                assert result.id == expected
            else:
                assert result == expected, kind


async def test_foreign_ids_are_not_found_and_untouched(solo, sides: tuple[Side, Side]) -> None:
    a, b = sides
    for attacker, victim in ((a, b), (b, a)):
        before = await solo.BatchGetAgents(
            agent_service_pb2.BatchGetAgentsRequest(ids=[x.id for x in victim.agents]), metadata=victim.md
        )
        for target in victim.agents:
            md = attacker.md
            await expect_error(get(solo, md, target.id), S.NOT_FOUND, "AGENT_NOT_FOUND")
            for etag in ("", target.etag):
                patch = agent_pb2.Agent(id=target.id, role="hijacked", name="hijacked", etag=etag)
                await expect_error(
                    solo.UpdateAgent(
                        agent_service_pb2.UpdateAgentRequest(
                            agent=patch, update_mask=field_mask_pb2.FieldMask(paths=["role", "name"])
                        ),
                        metadata=md,
                    ),
                    S.NOT_FOUND,
                    "AGENT_NOT_FOUND",
                )
                await expect_error(
                    solo.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=target.id, etag=etag), metadata=md),
                    S.NOT_FOUND,
                    "AGENT_NOT_FOUND",
                )
            await expect_error(
                solo.BatchGetAgents(agent_service_pb2.BatchGetAgentsRequest(ids=[target.id]), metadata=md),
                S.NOT_FOUND,
                "AGENT_NOT_FOUND",
            )
            await expect_error(
                solo.BatchGetAgents(
                    agent_service_pb2.BatchGetAgentsRequest(ids=[attacker.agents[0].id, target.id]), metadata=md
                ),
                S.NOT_FOUND,
                "AGENT_NOT_FOUND",
            )
        # The same attack, concurrently with the victim's own reads.
        attacks = [
            solo.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=t.id), metadata=attacker.md) for t in victim.agents
        ]
        reads = [get(solo, victim.md, t.id) for t in victim.agents]
        results = await asyncio.gather(*attacks, *reads, return_exceptions=True)
        for result in results[: len(attacks)]:
            assert isinstance(result, grpc.aio.AioRpcError) and result.code() == S.NOT_FOUND, result
        assert list(results[len(attacks) :]) == victim.agents
        after = await solo.BatchGetAgents(
            agent_service_pb2.BatchGetAgentsRequest(ids=[x.id for x in victim.agents]), metadata=victim.md
        )
        assert after == before
        assert list(after.agents) == victim.agents


async def test_request_ids_are_per_tenant(solo, sides: tuple[Side, Side]) -> None:
    a, b = sides
    request_id = str(uuid.uuid4())
    from_b = await create_agent(solo, b.md, f"rid-{request_id}", request_id=request_id)
    from_a = await create_agent(solo, a.md, f"rid-{request_id}", request_id=request_id)
    assert from_a.id != from_b.id
    await expect_error(get(solo, a.md, from_b.id), S.NOT_FOUND, "AGENT_NOT_FOUND")
    for side, made in ((a, from_a), (b, from_b)):
        await solo.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=made.id), metadata=side.md)


# --- the database itself ------------------------------------------------------------------------


async def _owner_counts(database: ScratchDatabase, tenant_id: uuid.UUID | None) -> dict[str, int]:
    con = await asyncpg.connect(database.owner_url)
    try:
        counts = {}
        for table in TENANT_TABLES:
            column = "id" if table == "tenants" else "tenant_id"
            if tenant_id is None:
                counts[table] = await con.fetchval(f"SELECT count(*) FROM {table}")
            else:
                counts[table] = await con.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", tenant_id)
        return counts
    finally:
        await con.close()


async def _counts(con: asyncpg.Connection) -> dict[str, int]:
    return {table: await con.fetchval(f"SELECT count(*) FROM {table}") for table in TENANT_TABLES}


async def test_app_role_sees_nothing_without_a_tenant(database: ScratchDatabase, sides: tuple[Side, Side]) -> None:
    a, b = sides
    tenant_a = uuid.UUID(a.keys.tenant.id)
    everything = await _owner_counts(database, None)
    only_a = await _owner_counts(database, tenant_a)
    assert all(everything[t] > only_a[t] > 0 for t in TENANT_TABLES), (everything, only_a)
    assert only_a["tenants"] == 1 and only_a["agents"] == len(a.agents)

    con = await asyncpg.connect(database.app_url)
    try:
        assert await con.fetchval("SELECT current_user") != "postgres"
        assert await _counts(con) == dict.fromkeys(TENANT_TABLES, 0)
        # A transaction scoped to tenant A sees exactly A's rows.
        async with con.transaction():
            await con.execute(f"SELECT set_config('agentstore.tenant_id', '{tenant_a}', true)")
            assert await _counts(con) == only_a
            assert (
                await con.fetchval("SELECT count(*) FROM agents WHERE tenant_id = $1", uuid.UUID(b.keys.tenant.id)) == 0
            )
            assert {str(r["id"]) for r in await con.fetch("SELECT id FROM agents")} == a.ids
        # After COMMIT on the same connection the setting is gone.
        assert await _counts(con) == dict.fromkeys(TENANT_TABLES, 0)
        # And after a rolled-back one.
        tx = con.transaction()
        await tx.start()
        await con.execute(f"SELECT set_config('agentstore.tenant_id', '{tenant_a}', true)")
        assert (await _counts(con))["agents"] == len(a.agents)
        await tx.rollback()
        assert await _counts(con) == dict.fromkeys(TENANT_TABLES, 0)
        # The one-round-trip read functions set the tenant for their own statement only.
        all_ids = [uuid.UUID(i) for i in a.ids | b.ids]
        read = await con.fetch("SELECT id FROM agentstore_read_agents($1, $2)", tenant_a, all_ids)
        assert {str(r["id"]) for r in read} == a.ids
        assert await con.fetchval("SELECT current_setting('agentstore.tenant_id', true)") in ("", None)
        assert await _counts(con) == dict.fromkeys(TENANT_TABLES, 0)
    finally:
        await con.close()


async def test_app_role_cannot_write_across_tenants(database: ScratchDatabase, sides: tuple[Side, Side]) -> None:
    a, b = sides
    con = await asyncpg.connect(database.app_url)
    try:
        # Without a tenant nothing can be written either.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await con.execute(
                "INSERT INTO agents (tenant_id, id, name) VALUES ($1, $2, 'sneaky')",
                uuid.UUID(b.keys.tenant.id),
                uuid.uuid4(),
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with con.transaction():
                await con.execute(f"SELECT set_config('agentstore.tenant_id', '{a.keys.tenant.id}', true)")
                await con.execute(
                    "INSERT INTO agents (tenant_id, id, name) VALUES ($1, $2, 'sneaky')",
                    uuid.UUID(b.keys.tenant.id),
                    uuid.uuid4(),
                )
        async with con.transaction():
            await con.execute(f"SELECT set_config('agentstore.tenant_id', '{a.keys.tenant.id}', true)")
            # B's rows are invisible to UPDATE and DELETE, so nothing changes.
            assert (
                await con.execute("UPDATE agents SET role = 'x' WHERE tenant_id = $1", uuid.UUID(b.keys.tenant.id))
                == "UPDATE 0"
            )
            assert (
                await con.execute("DELETE FROM agents WHERE tenant_id = $1", uuid.UUID(b.keys.tenant.id)) == "DELETE 0"
            )
    finally:
        await con.close()
    assert (await _owner_counts(database, uuid.UUID(b.keys.tenant.id)))["agents"] == len(b.agents)


async def test_app_role_cannot_change_the_audit_log(database: ScratchDatabase, sides: tuple[Side, Side]) -> None:
    a, _ = sides
    con = await asyncpg.connect(database.app_url)
    try:
        for statement in ("UPDATE audit_logs SET action = 'tampered'", "DELETE FROM audit_logs"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute(statement)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with con.transaction():
                    await con.execute(f"SELECT set_config('agentstore.tenant_id', '{a.keys.tenant.id}', true)")
                    await con.execute(statement)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await con.execute("TRUNCATE audit_logs")
    finally:
        await con.close()
    owner = await asyncpg.connect(database.owner_url)
    try:
        assert await owner.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'tampered'") == 0
        assert await owner.fetchval(
            "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND action = 'agent.create'",
            uuid.UUID(a.keys.tenant.id),
        ) >= len(a.agents)
    finally:
        await owner.close()
