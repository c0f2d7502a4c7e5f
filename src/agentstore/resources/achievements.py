"""Achievements: SQL, awards (explicit and for completed tasks), the leaderboard, the servicer.

The leaderboard is a Redis sorted set per tenant that always answers what PostgreSQL would:

* Awards to one agent are serialized by the agent's row lock (AwardAchievement takes it;
  CompleteTask holds it already, having updated the agent's completed_task_count). So the
  award statement, which runs after the lock was granted, sees every earlier award of the agent
  and returns the agent's exact new total (`agent_total`).
* After commit, `Leaderboard.awarded` writes that absolute total with ZADD LT on the negated
  total (totals only grow): repeats, retries and out-of-order updates cannot lower a score.
* Awards only ever update a board that exists, or the "pending" set of a rebuild in progress.
  A missing board is rebuilt from PostgreSQL by one reader holding a short marker key set
  *before* its snapshot: an award committed after the snapshot lands in the pending set and is
  merged (MAX) into the board; one committed before is in the snapshot. A rebuild whose marker
  was lost (expiry, FLUSHALL) is discarded. Lua scripts make each of these steps atomic.
* Scores are stored negated so that ZRANGE's ascending order is "points desc, agent_id asc"
  (canonical UUID text sorts like PostgreSQL's uuid order), which gives the ranks.
* A failed Redis update deletes the tenant's board (or, while Redis is unreachable, remembers
  the tenant and deletes the board before the outage circuit closes), so the next read rebuilds.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from agentstore.context import Principal, current_principal
from agentstore.db import Database, Record
from agentstore.errors import invalid_argument, invalid_field
from agentstore.query import FieldKind, FieldSpec, PageTokenCodec, SortKey
from agentstore.query.listing import ListSpec
from agentstore.redis.circuit import RedisCircuit
from agentstore.resources.agents import agent_not_found
from agentstore.resources.audit import write_audits
from agentstore.resources.fields import check_text, parse_id, to_timestamp
from agentstore.resources.paging import fetch_page
from agentstore.v1 import achievement_pb2, achievement_service_pb2, achievement_service_pb2_grpc

ENTITY = "achievement"
AWARD_ACTION = "achievement.award"
MAX_CODE = 64
MAX_TOP_N = 1000
# Entries above and below `around_agent_id` in GetLeaderboard.
AROUND = 2

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

GET_AWARD = f"""
SELECT {COLUMNS} FROM achievements a JOIN achievement_rules r ON r.code = a.code
WHERE a.tenant_id = $1 AND a.agent_id = $2 AND a.code = $3 AND a.task_id IS NOT DISTINCT FROM $4
"""

# Serializes awards to one agent (see the module docstring); no key columns change, so it
# does not block inserts that reference the agent.
LOCK_AGENT = "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2 FOR NO KEY UPDATE"

AGENT_EXISTS = "SELECT 1 FROM agents WHERE tenant_id = $1 AND id = $2"

# The leaderboard's truth, in board order.
TOTALS = """
SELECT agent_id, sum(points) AS total FROM achievements WHERE tenant_id = $1
GROUP BY agent_id HAVING sum(points) > 0
ORDER BY total DESC, agent_id
"""

_ID_KEY = SortKey("id", "id", FieldKind.UUID)
LIST_SPEC = ListSpec(
    resource="achievements",
    select=f"SELECT {COLUMNS} FROM achievements a JOIN achievement_rules r ON r.code = a.code WHERE a.tenant_id = $1",
    # Not client-facing: ListAchievementsRequest.agent_id becomes this filter, binding page tokens to it.
    fields={"agent_id": FieldSpec("a.agent_id", FieldKind.UUID)},
    sort_keys={"award_time": SortKey("award_time", "award_time", FieldKind.TIMESTAMP), "id": _ID_KEY},
    default_order="award_time desc, id desc",
    tie_breaker=_ID_KEY,
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


@dataclass(frozen=True)
class Entry:
    agent_id: str
    score: int
    rank: int

    def to_proto(self) -> achievement_pb2.LeaderboardEntry:
        return achievement_pb2.LeaderboardEntry(agent_id=self.agent_id, score=self.score, rank=self.rank)


def board_slice(ranked: Sequence[tuple[str, int]], top_n: int, around: str | None) -> tuple[list[Entry], list[Entry]]:
    """The top `top_n` entries and those around `around`, from (agent_id, total) in board order."""
    entries = [Entry(agent, score, i + 1) for i, (agent, score) in enumerate(ranked[:top_n])]
    near: list[Entry] = []
    if around is not None:
        position = next((i for i, (agent, _) in enumerate(ranked) if agent == around), None)
        if position is not None:
            start = max(0, position - AROUND)
            near = [Entry(a, s, start + i + 1) for i, (a, s) in enumerate(ranked[start : position + AROUND + 1])]
    return entries, near


# KEYS: board, building marker, pending. ARGV: pairs of (negated total, agent id).
_AWARDED_LUA = """
local target
if redis.call('EXISTS', KEYS[1]) == 1 then
  target = KEYS[1]
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  target = KEYS[3]
else
  return 0
end
for i = 1, #ARGV, 2 do
  redis.call('ZADD', target, 'LT', ARGV[i], ARGV[i + 1])
end
if target == KEYS[3] then
  redis.call('PEXPIRE', KEYS[3], redis.call('PTTL', KEYS[2]))
end
return 1
"""

# KEYS: board, building marker, pending. ARGV: marker token, then pairs of (negated total, agent id).
_FINALIZE_LUA = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'LT', ARGV[i], ARGV[i + 1])
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZUNIONSTORE', KEYS[1], 2, KEYS[1], KEYS[3], 'AGGREGATE', 'MIN')
  redis.call('DEL', KEYS[3])
end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: board. ARGV: top_n, around agent id or "". Returns nil when the board is missing, else
# {rank of the around agent or -1, top (member, score...), around (member, score...)}.
_READ_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return nil
end
local top = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local rank = -1
local near = {}
if ARGV[2] ~= '' then
  local found = redis.call('ZRANK', KEYS[1], ARGV[2])
  if found then
    rank = found
    near = redis.call('ZRANGE', KEYS[1], math.max(0, found - 2), found + 2, 'WITHSCORES')
  end
end
return {rank, top, near}
"""


def _pairs(flat: Sequence[bytes]) -> list[tuple[str, int]]:
    """ZRANGE WITHSCORES output (member, negated score, ...) → (agent_id, total)."""
    return [(flat[i].decode(), -int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]


class Leaderboard:
    """Per-tenant leaderboards in Redis, equal to PostgreSQL's totals (see the module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        circuit: RedisCircuit,
        db: Database,
        key_prefix: str,
        *,
        build_ttl_ms: int = 10_000,
    ) -> None:
        self._redis = redis
        self._circuit = circuit
        self._db = db
        self._prefix = key_prefix
        self._build_ttl_ms = build_ttl_ms
        self._awarded_script = redis.register_script(_AWARDED_LUA)
        self._finalize_script = redis.register_script(_FINALIZE_LUA)
        self._read_script = redis.register_script(_READ_LUA)
        # Tenants whose board may have missed an award while Redis was unreachable.
        self._stale: set[uuid.UUID] = set()
        circuit.on_recovery.append(self._drop_stale)

    def key(self, tenant_id: uuid.UUID) -> str:
        return f"{self._prefix}lb:{tenant_id}"

    def _keys(self, tenant_id: uuid.UUID) -> list[str]:
        board = self.key(tenant_id)
        return [board, f"{board}:building", f"{board}:pending"]

    async def awarded(self, tenant_id: uuid.UUID, rows: Sequence[Mapping[str, Any]]) -> None:
        """After commit: put the awarded agents' totals (rows' `agent_total`) on the board."""
        totals: dict[str, int] = {}
        for row in rows:
            agent = str(row["agent_id"])
            totals[agent] = max(totals.get(agent, 0), int(row["agent_total"]))
        args: list[str | int] = []
        for agent, total in totals.items():
            if total > 0:
                args += [-total, agent]
        if not args:
            return
        if not self._circuit.available:
            self._stale.add(tenant_id)
            return
        try:
            await self._awarded_script(keys=self._keys(tenant_id), args=args)
        except Exception as exc:
            await self._drop(tenant_id, exc)

    async def invalidate(self, tenant_id: uuid.UUID) -> None:
        """After commit of a change that lowers totals (deleting an agent cascades to its awards):
        the next read rebuilds the board from PostgreSQL."""
        if not self._circuit.available:
            self._stale.add(tenant_id)
            return
        await self._drop(tenant_id, ConnectionError("leaderboard not invalidated"))

    async def _drop(self, tenant_id: uuid.UUID, cause: Exception) -> None:
        """The board may have missed an award: delete it (with any rebuild in flight)."""
        try:
            await self._redis.delete(*self._keys(tenant_id))
        except Exception:
            self._stale.add(tenant_id)
            self._circuit.failed(cause)

    async def _drop_stale(self) -> None:
        # Runs before the circuit closes; raising keeps it open and tries again later.
        while self._stale:
            tenant_id = next(iter(self._stale))
            await self._redis.delete(*self._keys(tenant_id))
            self._stale.discard(tenant_id)

    async def top(
        self, tenant_id: uuid.UUID, top_n: int, around: uuid.UUID | None = None
    ) -> tuple[list[Entry], list[Entry]]:
        """The top `top_n` entries and those around `around` (empty if it has no points)."""
        around_text = str(around) if around is not None else None
        if self._circuit.available:
            try:
                found = await self._read_script(keys=[self.key(tenant_id)], args=[top_n, around_text or ""])
            except Exception as exc:
                self._circuit.failed(exc)
            else:
                if found is not None:
                    rank, top, near = found
                    entries = [Entry(a, s, i + 1) for i, (a, s) in enumerate(_pairs(top))]
                    start = max(0, int(rank) - AROUND)
                    return entries, [Entry(a, s, start + i + 1) for i, (a, s) in enumerate(_pairs(near))]
                return board_slice(await self._rebuild(tenant_id), top_n, around_text)
        return board_slice(await self._totals(tenant_id), top_n, around_text)

    async def _totals(self, tenant_id: uuid.UUID) -> list[tuple[str, int]]:
        rows = await self._db.run(lambda con: con.fetch(TOTALS, tenant_id), tenant_id, readonly=True)
        return [(str(row["agent_id"]), int(row["total"])) for row in rows]

    async def _rebuild(self, tenant_id: uuid.UUID) -> list[tuple[str, int]]:
        """Totals from PostgreSQL, written to the board if this call won the rebuild marker."""
        board, building, pending = self._keys(tenant_id)
        token = secrets.token_hex(16)
        try:
            # Before the snapshot: awards committed after it must find the marker.
            owner = await self._redis.set(building, token, nx=True, px=self._build_ttl_ms)
        except Exception as exc:
            self._circuit.failed(exc)
            owner = False
        ranked = await self._totals(tenant_id)
        if owner:
            args: list[str | int] = [token]
            for agent, total in ranked:
                args += [-total, agent]
            try:
                await self._finalize_script(keys=[board, building, pending], args=args)
            except Exception as exc:
                self._circuit.failed(exc)
        return ranked


class AchievementService(achievement_service_pb2_grpc.AchievementServiceServicer):
    def __init__(self, db: Database, page_tokens: PageTokenCodec, leaderboard: Leaderboard) -> None:
        self._db = db
        self._page_tokens = page_tokens
        self._leaderboard = leaderboard

    async def AwardAchievement(
        self, request: achievement_service_pb2.AwardAchievementRequest, context: Any
    ) -> achievement_pb2.Achievement:
        principal = current_principal()
        tenant = principal.tenant_id
        agent_id = parse_id(request.agent_id, "agent_id")
        check_text(request.code, "code", max_len=MAX_CODE, required=True)
        task_id = parse_id(request.task_id, "task_id") if request.task_id else None

        async def award(con: asyncpg.Connection) -> tuple[Record, bool]:
            if await con.fetchval(LOCK_AGENT, tenant, agent_id) is None:
                raise agent_not_found(agent_id)
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
        page, next_token = await fetch_page(
            self._db,
            self._page_tokens,
            LIST_SPEC,
            tenant,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=agent_filter,
        )
        return achievement_service_pb2.ListAchievementsResponse(
            achievements=[achievement_from_row(row) for row in page], next_page_token=next_token
        )

    async def GetLeaderboard(
        self, request: achievement_service_pb2.GetLeaderboardRequest, context: Any
    ) -> achievement_service_pb2.GetLeaderboardResponse:
        tenant = current_principal().tenant_id
        if not 1 <= request.top_n <= MAX_TOP_N:
            raise invalid_field("top_n", f"must be between 1 and {MAX_TOP_N}")
        around = parse_id(request.around_agent_id, "around_agent_id") if request.around_agent_id else None
        entries, near = await self._leaderboard.top(tenant, request.top_n, around)
        if around is not None and not near:
            exists = await self._db.run(lambda con: con.fetchval(AGENT_EXISTS, tenant, around), tenant, readonly=True)
            if exists is None:
                raise agent_not_found(around)
        return achievement_service_pb2.GetLeaderboardResponse(
            entries=[e.to_proto() for e in entries], around=[e.to_proto() for e in near]
        )
