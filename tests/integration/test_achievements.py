"""AchievementService end to end, the leaderboard against PostgreSQL's truth, and award_for_completion."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import duration_pb2

from agentstore.context import Principal, Role
from agentstore.devtools.embedded import EmbeddedRedis, free_port
from agentstore.resources.achievements import award_for_completion
from agentstore.resources.leaderboard import leaderboard
from agentstore.server import App, start_server
from agentstore.v1 import (
    achievement_pb2,
    achievement_service_pb2,
    achievement_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    audit_log_service_pb2,
    audit_log_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    tenant_service_pb2_grpc,
)
from tests.conftest import ScratchDatabase, Servers
from tests.integration.conftest import TenantFactory, TenantKeys, make_tenant, server_settings
from tests.integration.helpers import Metadata, create_agent, expect_error

S = grpc.StatusCode
POINTS = {"first_task": 10, "ten_tasks": 50, "hundred_tasks": 200}


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> achievement_service_pb2_grpc.AchievementServiceStub:
    return achievement_service_pb2_grpc.AchievementServiceStub(channel)


@pytest.fixture
async def redis_client(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(servers.redis_url)
    yield client
    await client.aclose()


async def award(
    stub: achievement_service_pb2_grpc.AchievementServiceStub, md: Metadata, agent_id: str, code: str, task_id: str = ""
) -> achievement_service_pb2.Achievement:
    return await stub.AwardAchievement(
        achievement_service_pb2.AwardAchievementRequest(agent_id=agent_id, code=code, task_id=task_id), metadata=md
    )


async def board(
    stub: achievement_service_pb2_grpc.AchievementServiceStub, md: Metadata, top_n: int = 1000, around: str = ""
) -> achievement_service_pb2.GetLeaderboardResponse:
    return await stub.GetLeaderboard(
        achievement_service_pb2.GetLeaderboardRequest(top_n=top_n, around_agent_id=around), metadata=md
    )


def entries(response_entries: object) -> list[tuple[str, int, int]]:
    return [(e.agent_id, e.score, e.rank) for e in response_entries]  # type: ignore[attr-defined]


async def sql_board(database: ScratchDatabase, tenant: TenantKeys) -> list[tuple[str, int, int]]:
    """The leaderboard computed directly in PostgreSQL (the owner role, tenant given explicitly)."""
    con = await asyncpg.connect(database.owner_url)
    try:
        rows = await con.fetch(
            """
            SELECT agent_id, sum(points) AS total FROM achievements WHERE tenant_id = $1
            GROUP BY agent_id HAVING sum(points) > 0 ORDER BY total DESC, agent_id
            """,
            uuid.UUID(tenant.tenant.id),
        )
    finally:
        await con.close()
    return [(str(r["agent_id"]), int(r["total"]), i + 1) for i, r in enumerate(rows)]


async def drop_boards(client: aioredis.Redis, app: App, tenant: TenantKeys | None = None) -> None:
    """What a FLUSHALL does to this run: every leaderboard key under the run's prefix is gone."""
    prefix = app.settings.redis_key_prefix
    pattern = f"{prefix}lb:{tenant.tenant.id}*" if tenant is not None else f"{prefix}lb:*"
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    if keys:
        await client.delete(*keys)


async def audit_rows(channel: grpc.aio.Channel, tenant: TenantKeys, entity_id: str) -> list[object]:
    audit = audit_log_service_pb2_grpc.AuditLogServiceStub(channel)
    response = await audit.ListAuditLogs(
        audit_log_service_pb2.ListAuditLogsRequest(filter=f'entity_type = "achievement" AND entity_id = "{entity_id}"'),
        metadata=tenant.md("reader"),
    )
    return list(response.audit_logs)


# --- AwardAchievement -------------------------------------------------------------------------


async def held_task(channel: grpc.aio.Channel, md: Metadata, agent_id: str) -> str:
    """A new task, claimed by the agent (so that it is the agent's), and its id."""
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)
    created = await tasks.CreateTask(
        task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title="earns an award", priority=10**6)), metadata=md
    )
    claimed = await tasks.ClaimTask(
        task_service_pb2.ClaimTaskRequest(agent_id=agent_id, lease_duration=duration_pb2.Duration(seconds=60)),
        metadata=md,
    )
    assert claimed.task.id == created.id
    return created.id


async def test_award_then_repeat_returns_the_same_award(stub, agents_stub, channel, tenant: TenantKeys) -> None:
    agent = await create_agent(agents_stub, tenant.md())
    task_id = await held_task(channel, tenant.md(), agent.id)
    first = await award(stub, tenant.md(), agent.id, "first_task", task_id)
    assert (first.agent_id, first.code, first.task_id, first.points) == (agent.id, "first_task", task_id, 10)
    assert first.title == "First task" and first.HasField("award_time")

    again = await award(stub, tenant.md(), agent.id, "first_task", task_id)
    assert again == first
    rows = await audit_rows(channel, tenant, first.id)
    assert len(rows) == 1
    assert rows[0].action == "achievement.award"  # type: ignore[attr-defined]
    assert rows[0].after["code"] == "first_task"  # type: ignore[attr-defined]

    # Without a task the award is still made once per code; another task earns it again.
    untied = await award(stub, tenant.md(), agent.id, "first_task")
    assert untied.task_id == "" and untied.id != first.id
    assert await award(stub, tenant.md(), agent.id, "first_task") == untied
    other = await award(stub, tenant.md(), agent.id, "first_task", await held_task(channel, tenant.md(), agent.id))
    assert other.id not in (first.id, untied.id)

    listed = await stub.ListAchievements(
        achievement_service_pb2.ListAchievementsRequest(agent_id=agent.id), metadata=tenant.md("reader")
    )
    assert [a.id for a in listed.achievements] == [other.id, untied.id, first.id]  # newest first
    assert (await board(stub, tenant.md("reader"))).entries[0].score == 30


async def test_award_for_a_task_needs_a_task_of_the_agent(
    stub, agents_stub, channel, tenant: TenantKeys, new_tenant: TenantFactory
) -> None:
    agent = await create_agent(agents_stub, tenant.md())
    someone_else = await create_agent(agents_stub, tenant.md())
    others = await held_task(channel, tenant.md(), someone_else.id)
    await expect_error(
        award(stub, tenant.md(), agent.id, "first_task", others), S.FAILED_PRECONDITION, "TASK_NOT_OF_AGENT"
    )
    await expect_error(
        award(stub, tenant.md(), agent.id, "first_task", str(uuid.uuid4())), S.NOT_FOUND, "TASK_NOT_FOUND"
    )
    # Another tenant's task is invisible, even to an agent that holds it there.
    stranger = await new_tenant("stranger")
    strangers_agent = await create_agent(agents_stub, stranger.md())
    strangers_task = await held_task(channel, stranger.md(), strangers_agent.id)
    await expect_error(award(stub, tenant.md(), agent.id, "first_task", strangers_task), S.NOT_FOUND, "TASK_NOT_FOUND")
    rows = await stub.ListAchievements(
        achievement_service_pb2.ListAchievementsRequest(agent_id=agent.id), metadata=tenant.md()
    )
    assert list(rows.achievements) == []


async def test_award_errors(stub, agents_stub, tenant: TenantKeys, new_tenant: TenantFactory) -> None:
    agent = await create_agent(agents_stub, tenant.md())
    await expect_error(
        award(stub, tenant.md(), agent.id, "no_such_rule"), S.INVALID_ARGUMENT, "ACHIEVEMENT_UNKNOWN", field="code"
    )
    await expect_error(award(stub, tenant.md(), agent.id, ""), S.INVALID_ARGUMENT, "INVALID_FIELD", field="code")
    await expect_error(award(stub, tenant.md(), "nope", "first_task"), S.INVALID_ARGUMENT, "INVALID_ID")
    await expect_error(award(stub, tenant.md(), agent.id, "first_task", "x"), S.INVALID_ARGUMENT, "INVALID_ID")
    await expect_error(award(stub, tenant.md(), str(uuid.uuid4()), "first_task"), S.NOT_FOUND, "AGENT_NOT_FOUND")
    await expect_error(award(stub, tenant.md("reader"), agent.id, "first_task"), S.PERMISSION_DENIED, "ROLE_FORBIDDEN")

    other = await new_tenant("other")
    await expect_error(award(stub, other.md(), agent.id, "first_task"), S.NOT_FOUND, "AGENT_NOT_FOUND")
    await expect_error(board(stub, other.md(), around=agent.id), S.NOT_FOUND, "AGENT_NOT_FOUND")
    listed = await stub.ListAchievements(achievement_service_pb2.ListAchievementsRequest(), metadata=other.md())
    assert list(listed.achievements) == []

    for top_n in (0, -1, 1001):
        await expect_error(board(stub, tenant.md(), top_n=top_n), S.INVALID_ARGUMENT, "INVALID_FIELD", field="top_n")
    await expect_error(board(stub, tenant.md(), around="x"), S.INVALID_ARGUMENT, "INVALID_ID")


async def test_list_pages_and_tokens_are_bound_to_the_agent(stub, agents_stub, channel, tenant: TenantKeys) -> None:
    agent = await create_agent(agents_stub, tenant.md())
    made = [
        await award(stub, tenant.md(), agent.id, "first_task", await held_task(channel, tenant.md(), agent.id))
        for _ in range(5)
    ]
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListAchievements(
            achievement_service_pb2.ListAchievementsRequest(agent_id=agent.id, page_size=2, page_token=token),
            metadata=tenant.md("reader"),
        )
        seen += [a.id for a in page.achievements]
        token = page.next_page_token
        if not token:
            break
        other_agent = achievement_service_pb2.ListAchievementsRequest(agent_id=str(uuid.uuid4()), page_token=token)
        await expect_error(
            stub.ListAchievements(other_agent, metadata=tenant.md("reader")), S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"
        )
    assert seen == [a.id for a in reversed(made)]


# --- the leaderboard ----------------------------------------------------------------------------


async def test_leaderboard_order_ranks_and_around(stub, agents_stub, database, tenant: TenantKeys) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(7)]
    # Points: 260, 60, 60, 50, 10, 10, and one agent with none.
    plan = [
        ["first_task", "ten_tasks", "hundred_tasks"],
        ["first_task", "ten_tasks"],
        ["first_task", "ten_tasks"],
        ["ten_tasks"],
        ["first_task"],
        ["first_task"],
        [],
    ]
    for agent, codes in zip(agents, plan, strict=True):
        for code in codes:
            await award(stub, tenant.md(), agent.id, code)
    expected = await sql_board(database, tenant)
    assert [score for _, score, _ in expected] == [260, 60, 60, 50, 10, 10]
    tied = sorted([agents[1].id, agents[2].id])
    assert [agent for agent, _, _ in expected[1:3]] == tied  # ties by agent_id ascending

    response = await board(stub, tenant.md("reader"))
    assert entries(response.entries) == expected
    assert list(response.around) == []
    assert entries((await board(stub, tenant.md(), top_n=2)).entries) == expected[:2]

    middle = expected[3][0]
    assert entries((await board(stub, tenant.md(), top_n=1, around=middle)).around) == expected[1:6]
    assert entries((await board(stub, tenant.md(), top_n=1, around=expected[0][0])).around) == expected[:3]
    assert entries((await board(stub, tenant.md(), top_n=1, around=expected[-1][0])).around) == expected[-3:]
    # An agent without points is not on the board.
    assert list((await board(stub, tenant.md(), around=agents[6].id)).around) == []

    # A deleted agent's awards go with it (the foreign key cascades).
    await agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=agents[0].id), metadata=tenant.md())
    assert all(agent != agents[0].id for agent, _, _ in await sql_board(database, tenant))


async def test_leaderboard_is_rebuilt_after_redis_loses_it(
    stub, agents_stub, app: App, database, redis_client, tenant: TenantKeys
) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(3)]
    for i, agent in enumerate(agents):
        for code in list(POINTS)[: i + 1]:
            await award(stub, tenant.md(), agent.id, code)
        if i == 0:
            # The first read builds the board; later awards update it in place.
            await board(stub, tenant.md())
    key = app.deps.shared(leaderboard).key(uuid.UUID(tenant.tenant.id))
    assert await redis_client.exists(key)
    assert entries((await board(stub, tenant.md())).entries) == await sql_board(database, tenant)

    await drop_boards(redis_client, app)
    # An award while the board is missing must not create a partial board.
    await award(stub, tenant.md(), agents[0].id, "ten_tasks")
    assert not await redis_client.exists(key)

    assert entries((await board(stub, tenant.md())).entries) == await sql_board(database, tenant)
    assert await redis_client.exists(key)
    await award(stub, tenant.md(), agents[0].id, "hundred_tasks")
    assert entries((await board(stub, tenant.md())).entries) == await sql_board(database, tenant)


async def test_leaderboard_equals_sql_after_concurrent_awards(
    stub, agents_stub, channel, app: App, database, redis_client, tenant: TenantKeys
) -> None:
    agents = [await create_agent(agents_stub, tenant.md()) for _ in range(6)]
    # Awards for a task need a task the agent claimed: four each.
    held = {a.id: [await held_task(channel, tenant.md(), a.id) for _ in range(4)] for a in agents}
    rng = random.Random(7)

    def any_award() -> Awaitable[achievement_pb2.Achievement]:
        agent_id = rng.choice(agents).id
        return award(stub, tenant.md(), agent_id, rng.choice(list(POINTS)), rng.choice([*held[agent_id], ""]))

    calls = [any_award() for _ in range(50)]
    await asyncio.gather(*calls)
    assert entries((await board(stub, tenant.md())).entries) == await sql_board(database, tenant)

    # Again, with the board dropped first so rebuilds race the awards.
    await drop_boards(redis_client, app, tenant)
    calls = [any_award() for _ in range(50)]
    reads = [board(stub, tenant.md()) for _ in range(10)]
    await asyncio.gather(*calls, *reads)
    assert entries((await board(stub, tenant.md())).entries) == await sql_board(database, tenant)


# --- award_for_completion, as the TaskService calls it -------------------------------------------


async def test_award_for_completion_is_rule_driven_and_idempotent(
    agents_stub, stub, database: ScratchDatabase, tenant: TenantKeys
) -> None:
    agent = await create_agent(agents_stub, tenant.md())
    tenant_id, agent_id = uuid.UUID(tenant.tenant.id), uuid.UUID(agent.id)
    principal = Principal(tenant_id, uuid.UUID(tenant.writer_key_id), Role.WRITER)
    con = await asyncpg.connect(database.app_url)
    try:

        async def complete(count: int, task_id: uuid.UUID) -> list[tuple[str, int]]:
            async with con.transaction():
                await con.execute("SELECT set_config('agentstore.tenant_id', $1, true)", str(tenant_id))
                await con.execute(
                    "UPDATE agents SET completed_task_count = $3 WHERE tenant_id = $1 AND id = $2",
                    tenant_id,
                    agent_id,
                    count,
                )
                rows = await award_for_completion(con, principal, tenant_id, agent_id, task_id, count)
            return [(r["code"], r["agent_total"]) for r in rows]

        task = uuid.uuid4()
        assert await complete(1, task) == [("first_task", 10)]
        assert await complete(1, task) == []  # a retry awards nothing twice
        assert await complete(2, uuid.uuid4()) == []
        assert await complete(10, uuid.uuid4()) == [("ten_tasks", 60)]
        assert await complete(100, uuid.uuid4()) == [("hundred_tasks", 260)]
        async with con.transaction():
            await con.execute("SELECT set_config('agentstore.tenant_id', $1, true)", str(tenant_id))
            audits = await con.fetchval(
                "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND action = 'achievement.award'", tenant_id
            )
        assert audits == 3
    finally:
        await con.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), append_only=False)
    server.start()
    yield server
    server.stop(force=True)


async def test_leaderboard_equals_sql_after_a_real_flushall(
    own_redis: EmbeddedRedis, database: ScratchDatabase, redis_prefix: str, new_tenant: TenantFactory
) -> None:
    """A server on a Redis this test owns, so FLUSHALL wipes everything it cached, not other runs' keys.
    The points come from CompleteTask, so the rules' awards in its transaction are what is counted."""
    app = await start_server(server_settings(redis_prefix), database.app_url, own_redis.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            tenant = await make_tenant(tenant_service_pb2_grpc.TenantServiceStub(ch), f"flush-{uuid.uuid4().hex[:8]}")
            md = tenant.md()
            agents = agent_service_pb2_grpc.AgentServiceStub(ch)
            tasks = task_service_pb2_grpc.TaskServiceStub(ch)
            achievements = achievement_service_pb2_grpc.AchievementServiceStub(ch)
            workers = [await create_agent(agents, md) for _ in range(3)]
            lease = duration_pb2.Duration(seconds=60)
            for count, worker in zip((10, 3, 1), workers, strict=True):
                for i in range(count):
                    await tasks.CreateTask(
                        task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=f"w{i}")), metadata=md
                    )
                    claimed = await tasks.ClaimTask(
                        task_service_pb2.ClaimTaskRequest(agent_id=worker.id, lease_duration=lease), metadata=md
                    )
                    await tasks.CompleteTask(
                        task_service_pb2.CompleteTaskRequest(task_id=claimed.task.id, lease_token=claimed.lease_token),
                        metadata=md,
                    )
            before = entries((await board(achievements, md)).entries)
            truth = await sql_board(database, tenant)
            assert before == truth and [e[0] for e in truth] == [w.id for w in workers[:1]] + sorted(
                w.id for w in workers[1:]
            )
            client = aioredis.from_url(own_redis.url)
            try:
                assert await client.dbsize() > 0
                await client.flushall()
                assert await client.dbsize() == 0
            finally:
                await client.aclose()
            assert entries((await board(achievements, md)).entries) == truth
            around = await board(achievements, md, top_n=1, around=workers[2].id)
            assert entries(around.entries) == truth[:1]
            assert [e.agent_id for e in around.around] == [e[0] for e in truth]
    finally:
        await app.stop(0)
