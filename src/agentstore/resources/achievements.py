"""Achievements: SQL, awards (explicit and for completed tasks), and the AchievementService servicer.

Awards to one agent are serialized by the agent's row lock (AwardAchievement takes it;
CompleteTask holds it already, having updated the agent's completed_task_count), so the award
statement sees every earlier award of the agent and returns the agent's exact new total
(`agent_total`), which the leaderboard (leaderboard.py) takes after commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc

from agentstore.cache.entity import EntityCache
from agentstore.context import Principal, current_principal
from agentstore.db import Database, Record
from agentstore.deps import Add, Deps, Resource
from agentstore.errors import ApiError, FieldViolation, invalid_argument, invalid_field, not_found
from agentstore.query import FieldKind, FieldSpec
from agentstore.query.listing import ID_KEY, ListSpec, sort_keys
from agentstore.resources.agents import agent_cache, agent_not_found, lock_agents
from agentstore.resources.audit import write_audits
from agentstore.resources.fields import check_text, parse_id, to_timestamp
from agentstore.resources.leaderboard import Leaderboard, leaderboard
from agentstore.resources.paging import Pages
from agentstore.v1 import achievement_pb2, achievement_service_pb2, achievement_service_pb2_grpc

ENTITY = "achievement"
AWARD_ACTION = "achievement.award"
MAX_CODE = 64
MAX_TOP_N = 1000
COLUMNS = "a.id, a.agent_id, a.code, a.task_id, r.title, a.points, a.award_time"

# Inserts the awards of the rules matching {rules} ($4), skipping those the agent already has,
# and returns each new award with the agent's total points after this statement. The CTE's
# insert is invisible to the subquery (one snapshot), hence "earlier total + new points".
_AWARD = """
WITH awarded AS (
    INSERT INTO achievements (tenant_id, id, agent_id, code, task_id, points)
    SELECT $1, gen_random_uuid(), $2, r.code, $3, r.points
    FROM achievement_rules r
    WHERE {rules}
    ON CONFLICT ON CONSTRAINT achievements_award_key DO NOTHING
    RETURNING id, agent_id, code, task_id, points, award_time
)
SELECT {columns},
       (SELECT coalesce(sum(points), 0) FROM achievements WHERE tenant_id = $1 AND agent_id = $2)
       + sum(a.points) OVER () AS agent_total
FROM awarded a JOIN achievement_rules r ON r.code = a.code
ORDER BY r.code
"""
AWARD_FOR_COMPLETION = _AWARD.format(rules="r.completed_tasks = $4", columns=COLUMNS)
AWARD_BY_CODE = _AWARD.format(rules="r.code = $4", columns=COLUMNS)

# Whose the task is: an award for a task must name one the agent holds or held.
TASK_HOLDER = "SELECT assigned_agent_id FROM tasks WHERE tenant_id = $1 AND id = $2"

GET_AWARD = f"""
SELECT {COLUMNS} FROM achievements a JOIN achievement_rules r ON r.code = a.code
WHERE a.tenant_id = $1 AND a.agent_id = $2 AND a.code = $3 AND a.task_id IS NOT DISTINCT FROM $4
"""

LIST_SPEC = ListSpec(
    resource="achievements",
    select=f"SELECT {COLUMNS} FROM achievements a JOIN achievement_rules r ON r.code = a.code WHERE a.tenant_id = $1",
    # Not client-facing: ListAchievementsRequest.agent_id becomes this filter, binding page tokens to it.
    fields={"agent_id": FieldSpec("a.agent_id", FieldKind.UUID)},
    sort_keys={**sort_keys(award_time=FieldKind.TIMESTAMP), "id": ID_KEY},
    default_order="award_time desc, id desc",
    tie_breaker=ID_KEY,
)


def achievement_from_row(row: Record) -> achievement_pb2.Achievement:
    achievement = achievement_pb2.Achievement(
        id=str(row["id"]),
        agent_id=str(row["agent_id"]),
        code=row["code"],
        task_id=str(row["task_id"]) if row["task_id"] is not None else "",
        title=row["title"],
        points=row["points"],
    )
    to_timestamp(row["award_time"], achievement.award_time)
    return achievement


async def _audit_awards(
    con: asyncpg.Connection, principal: Principal, tenant_id: uuid.UUID, rows: Sequence[Record]
) -> None:
    """One audit row per new award, all in one statement (none when nothing was awarded)."""
    await write_audits(
        con, principal, tenant_id, [(AWARD_ACTION, ENTITY, row["id"], None, achievement_from_row(row)) for row in rows]
    )


async def award_for_completion(
    con: asyncpg.Connection,
    principal: Principal,
    tenant_id: uuid.UUID,
    agent_id: uuid.UUID,
    task_id: uuid.UUID,
    completed_count: int,
) -> list[Record]:
    """Awards every rule whose `completed_tasks` equals `completed_count`, in the caller's transaction.

    Two statements at most: the idempotent insert (INSERT ... ON CONFLICT DO NOTHING RETURNING)
    and, when something new was awarded, its audit rows.

    The caller must hold the agent's row lock (the UPDATE of its completed_task_count does) so
    that each row's `agent_total` is exact. Returns the new awards (none when the count earns
    nothing or was already rewarded); pass them to `Leaderboard.awarded` after commit.
    """
    rows: list[Record] = await con.fetch(AWARD_FOR_COMPLETION, tenant_id, agent_id, task_id, completed_count)
    await _audit_awards(con, principal, tenant_id, rows)
    return rows


async def _check_task_of(con: asyncpg.Connection, tenant: uuid.UUID, agent_id: uuid.UUID, task_id: uuid.UUID) -> None:
    """NOT_FOUND unless the tenant has the task; FAILED_PRECONDITION unless the agent holds or held it."""
    holder = await con.fetchrow(TASK_HOLDER, tenant, task_id)
    if holder is None:
        raise not_found("TASK_NOT_FOUND", f"no task {task_id}")
    if holder["assigned_agent_id"] != agent_id:
        raise ApiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "TASK_NOT_OF_AGENT",
            f"task {task_id} was never claimed by agent {agent_id}",
            (FieldViolation("task_id", "not a task this agent claimed"),),
        )


class AchievementService(achievement_service_pb2_grpc.AchievementServiceServicer):
    def __init__(self, db: Database, pages: Pages, board: Leaderboard, agents: EntityCache) -> None:
        self._db = db
        self._pages = pages
        self._leaderboard = board
        self._agents = agents

    async def AwardAchievement(
        self, request: achievement_service_pb2.AwardAchievementRequest, context: Any
    ) -> achievement_pb2.Achievement:
        principal = current_principal()
        tenant = principal.tenant_id
        agent_id = parse_id(request.agent_id, "agent_id")
        check_text(request.code, "code", max_len=MAX_CODE, required=True)
        task_id = parse_id(request.task_id, "task_id") if request.task_id else None

        async def award(con: asyncpg.Connection) -> tuple[Record, bool]:
            # Serializes awards to the agent (see the module docstring).
            if not await lock_agents(con, tenant, [agent_id]):
                raise agent_not_found(agent_id)
            if task_id is not None:
                await _check_task_of(con, tenant, agent_id, task_id)
            rows = await con.fetch(AWARD_BY_CODE, tenant, agent_id, task_id, request.code)
            if rows:
                await _audit_awards(con, principal, tenant, rows)
                return rows[0], True
            existing = await con.fetchrow(GET_AWARD, tenant, agent_id, request.code, task_id)
            if existing is None:
                raise invalid_argument(
                    "ACHIEVEMENT_UNKNOWN", f"no achievement rule {request.code!r}", [("code", "unknown achievement")]
                )
            return existing, False

        row, new = await self._db.run(award, tenant)
        if new:
            await self._leaderboard.awarded(tenant, [row])
        return achievement_from_row(row)

    async def ListAchievements(
        self, request: achievement_service_pb2.ListAchievementsRequest, context: Any
    ) -> achievement_service_pb2.ListAchievementsResponse:
        tenant = current_principal().tenant_id
        agent_filter = f'agent_id = "{parse_id(request.agent_id, "agent_id")}"' if request.agent_id else ""
        items, next_token = await self._pages.fetch(
            LIST_SPEC, tenant, request, achievement_from_row, filter=agent_filter
        )
        return achievement_service_pb2.ListAchievementsResponse(achievements=items, next_page_token=next_token)

    async def GetLeaderboard(
        self, request: achievement_service_pb2.GetLeaderboardRequest, context: Any
    ) -> achievement_service_pb2.GetLeaderboardResponse:
        tenant = current_principal().tenant_id
        if not 1 <= request.top_n <= MAX_TOP_N:
            raise invalid_field("top_n", f"must be between 1 and {MAX_TOP_N}")
        around = parse_id(request.around_agent_id, "around_agent_id") if request.around_agent_id else None
        entries, near = await self._leaderboard.top(tenant, request.top_n, around)
        if around is not None and not near and await self._agents.get((tenant, around)) is None:
            raise agent_not_found(around)
        return achievement_service_pb2.GetLeaderboardResponse(
            entries=[e.to_proto() for e in entries], around=[e.to_proto() for e in near]
        )


def register(add: Add, deps: Deps) -> None:
    add(
        achievement_service_pb2_grpc.add_AchievementServiceServicer_to_server,
        AchievementService(deps.db, deps.pages, deps.shared(leaderboard), deps.shared(agent_cache)),
    )


RESOURCE = Resource.of(achievement_service_pb2, "AchievementService", register)
