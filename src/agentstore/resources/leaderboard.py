"""Per-tenant achievement leaderboards: a Redis sorted set per tenant that always answers what
PostgreSQL would.

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
* A failed Redis update deletes the tenant's board (or, while Redis is unreachable, records the
  deletion as a cache repair in PostgreSQL, done by whichever process reaches Redis first), so the
  next read rebuilds; no process reads a board while a repair of it is pending.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from agentstore.cache.repairs import CacheRepairs, Repair, RepairHandler
from agentstore.cache.trust import CacheTrust
from agentstore.db import Database
from agentstore.deps import Deps
from agentstore.redis import REDIS_ERRORS
from agentstore.redis.circuit import RedisCircuit
from agentstore.v1 import achievement_pb2

REPAIR_KIND = "leaderboard"
# Entries above and below `around_agent_id` in GetLeaderboard.
AROUND = 2

# The leaderboard's truth, in board order.
TOTALS = """
SELECT agent_id, sum(points) AS total FROM achievements WHERE tenant_id = $1
GROUP BY agent_id HAVING sum(points) > 0
ORDER BY total DESC, agent_id
"""


@dataclass(frozen=True)
class BoardEntry:
    agent_id: str
    score: int
    rank: int

    def to_proto(self) -> achievement_pb2.LeaderboardEntry:
        return achievement_pb2.LeaderboardEntry(agent_id=self.agent_id, score=self.score, rank=self.rank)


def board_slice(
    ranked: Sequence[tuple[str, int]], top_n: int, around: str | None
) -> tuple[list[BoardEntry], list[BoardEntry]]:
    """The top `top_n` entries and those around `around`, from (agent_id, total) in board order."""
    entries = [BoardEntry(agent, score, i + 1) for i, (agent, score) in enumerate(ranked[:top_n])]
    near: list[BoardEntry] = []
    if around is not None:
        position = next((i for i, (agent, _) in enumerate(ranked) if agent == around), None)
        if position is not None:
            start = max(0, position - AROUND)
            near = [BoardEntry(a, s, start + i + 1) for i, (a, s) in enumerate(ranked[start : position + AROUND + 1])]
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
        repairs: CacheRepairs,
        trust: CacheTrust,
        db: Database,
        key_prefix: str,
        *,
        build_ttl_ms: int = 10_000,
    ) -> None:
        self._redis = redis
        self._circuit = circuit
        self._repairs = repairs
        self._trust = trust
        self._db = db
        self._prefix = key_prefix
        self._build_ttl_ms = build_ttl_ms
        self._awarded_script = redis.register_script(_AWARDED_LUA)
        self._finalize_script = redis.register_script(_FINALIZE_LUA)
        self._read_script = redis.register_script(_READ_LUA)
        # A board that may have missed an award is deleted by a cache repair (cache/repairs.py),
        # recorded in PostgreSQL, so that it is done even if this process is gone by then.
        repairs.handle(REPAIR_KIND, RepairHandler(local=lambda repairs: None, redis=self._drop_boards))

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
            await self._repair_later(tenant_id)
            return
        try:
            await self._awarded_script(keys=self._keys(tenant_id), args=args)
        except REDIS_ERRORS as exc:
            await self._drop(tenant_id, exc)

    async def invalidate(self, tenant_id: uuid.UUID) -> None:
        """After commit of a change that lowers totals (deleting an agent cascades to its awards):
        the next read rebuilds the board from PostgreSQL."""
        if not self._circuit.available:
            await self._repair_later(tenant_id)
            return
        await self._drop(tenant_id, ConnectionError("leaderboard not invalidated"))

    async def _drop(self, tenant_id: uuid.UUID, cause: BaseException) -> None:
        """The board may have missed an award: delete it (with any rebuild in flight)."""
        try:
            await self._redis.delete(*self._keys(tenant_id))
        except REDIS_ERRORS:
            self._circuit.failed(cause)
            await self._repair_later(tenant_id)

    async def _repair_later(self, tenant_id: uuid.UUID) -> None:
        """Redis could not take the change: the board's deletion becomes a recorded cache repair,
        and the writer outlasts every process's lease (cache/trust.py) before it answers."""
        await self._repairs.record(Repair(REPAIR_KIND, tenant_id, None, None))
        await self._trust.outlast()

    async def _drop_boards(self, repairs: Sequence[Repair]) -> None:
        keys = [key for tenant_id in {r.tenant_id for r in repairs} for key in self._keys(tenant_id)]
        await self._redis.delete(*keys)

    async def top(
        self, tenant_id: uuid.UUID, top_n: int, around: uuid.UUID | None = None
    ) -> tuple[list[BoardEntry], list[BoardEntry]]:
        """The top `top_n` entries and those around `around` (empty if it has no points)."""
        around_text = str(around) if around is not None else None
        # A board is trusted under the same lease as cached entities: no repair of it is pending.
        if self._circuit.available and self._trust.l2():
            try:
                found = await self._read_script(keys=[self.key(tenant_id)], args=[top_n, around_text or ""])
            except REDIS_ERRORS as exc:
                self._circuit.failed(exc)
            else:
                if found is not None:
                    rank, top, near = found
                    entries = [BoardEntry(a, s, i + 1) for i, (a, s) in enumerate(_pairs(top))]
                    start = max(0, int(rank) - AROUND)
                    return entries, [BoardEntry(a, s, start + i + 1) for i, (a, s) in enumerate(_pairs(near))]
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
        except REDIS_ERRORS as exc:
            self._circuit.failed(exc)
            owner = False
        ranked = await self._totals(tenant_id)
        if owner:
            args: list[str | int] = [token]
            for agent, total in ranked:
                args += [-total, agent]
            try:
                await self._finalize_script(keys=[board, building, pending], args=args)
            except REDIS_ERRORS as exc:
                self._circuit.failed(exc)
        return ranked


def leaderboard(deps: Deps) -> Leaderboard:
    """The one leaderboard engine of a server (achievements award, agents invalidate, the queue awards)."""
    return Leaderboard(deps.redis, deps.circuit, deps.repairs, deps.trust, deps.db, deps.settings.redis_key_prefix)
