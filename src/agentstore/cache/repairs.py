"""Cache repairs: what a writer could not put into Redis, recorded in PostgreSQL so that it
outlives the writer (migration 0008; the argument is in cache/trust.py).

A writer whose post-commit Redis write failed records (kind, tenant, entity, version) before it
answers. Every process polls the pending repairs (AGENTSTORE_CACHE_REPAIR_POLL_SECONDS): it drops
what its own L1 holds below each version at once, and, while Redis answers, does the repair (a
tombstone at the version in L2, which refuses older copies and reads as a miss; for a leaderboard,
the board's deletion) and marks it done. Until no repair is pending, no process trusts L2.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from agentstore.cache.trust import CacheTrust
from agentstore.db import Database, Record
from agentstore.errors import ApiError
from agentstore.redis import REDIS_ERRORS
from agentstore.redis.circuit import RedisCircuit

log = logging.getLogger(__name__)

RECORD = "INSERT INTO cache_repairs (keyspace, kind, tenant_id, entity_id, version) VALUES ($1, $2, $3, $4, $5)"
# The repairs this process has not applied to its own memory yet: the pending ones, and those done
# since its last poll ($1, that poll's now(), less a margin for a repairing transaction that
# started before and committed after it; NULL at start, when memory is empty). Re-applying one
# is harmless. `stale`: the last poll is so old that pruned repairs may be missed.
PENDING = """
SELECT now() AS polled_at, $1::timestamptz < now() - interval '30 minutes' AS stale,
       r.id, r.kind, r.tenant_id, r.entity_id, r.version, r.repair_time IS NULL AS pending
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT * FROM cache_repairs
    WHERE keyspace = $3 AND (repair_time IS NULL OR repair_time >= $1::timestamptz - interval '10 seconds')
    ORDER BY id LIMIT $2
) AS r ON true
"""
DONE = "UPDATE cache_repairs SET repair_time = now() WHERE id = ANY($1::bigint[])"
PRUNE = "DELETE FROM cache_repairs WHERE keyspace = $2 AND repair_time < now() - $1::interval"
BATCH = 1000


@dataclass(frozen=True)
class Repair:
    kind: str
    tenant_id: uuid.UUID
    entity_id: uuid.UUID | None
    version: int | None


@dataclass(frozen=True)
class RepairHandler:
    # Drop what this process's own memory holds of the repaired entries (at once, no I/O).
    local: Callable[[Sequence[Repair]], None]
    # Put the repairs into Redis (raises a Redis error when it cannot).
    redis: Callable[[Sequence[Repair]], Awaitable[None]]
    # Drop everything this process holds in memory (it may have missed repairs).
    forget_all: Callable[[], None] = lambda: None


class CacheRepairs:
    def __init__(self, db: Database, circuit: RedisCircuit, trust: CacheTrust, keyspace: str) -> None:
        """`keyspace`: the Redis key prefix of the deployment (AGENTSTORE_REDIS_KEY_PREFIX). Every
        process of a deployment shares one Redis and prefix (else their caches could not be
        coherent at all); deployments that share a database under other prefixes (a test suite's
        servers on Redis servers of their own) never do each other's repairs."""
        self._keyspace = keyspace
        self._db = db
        self._circuit = circuit
        self._trust = trust
        self._handlers: dict[str, RepairHandler] = {}
        # PostgreSQL's now() at the last poll: repairs done since then are applied again locally.
        self._since: datetime | None = None

    def handle(self, kind: str, handler: RepairHandler) -> None:
        self._handlers[kind] = handler

    async def record(self, repair: Repair) -> None:
        """Before a writer answers: what Redis lacks, in PostgreSQL. Known to this process at once."""
        self._trust.repairs_pending()
        args = (self._keyspace, repair.kind, repair.tenant_id, repair.entity_id, repair.version)
        try:
            await self._db.run(lambda con: con.execute(RECORD, *args), None)
        except ApiError:
            # PostgreSQL is gone too (right after the write committed): nothing durable can be
            # kept; this process's next poll fails as well, so it trusts no cache until both return.
            log.exception("cache repair not recorded", extra={"kind": repair.kind})

    async def poll(self) -> int:
        """Apply the repairs this process has not seen; how many pending ones were done here (a
        background job, every poll interval). Every process applies each repair to its own memory,
        pending or done elsewhere meanwhile; the Redis part is done once, by whoever gets to it."""
        started = time.monotonic()
        rows: list[Record] = await self._db.run(
            lambda con: con.fetch(PENDING, self._since, BATCH, self._keyspace), None, readonly=True
        )
        if rows[0]["stale"]:
            for each in self._handlers.values():
                each.forget_all()
        seen = [r for r in rows if r["id"] is not None]
        for kind, group in _by_kind(seen).items():
            local = self._handlers.get(kind)
            if local is not None:
                local.local(group)
        pending = [r for r in seen if r["pending"]]
        done = False
        if pending and self._circuit.available:
            try:
                for kind, group in _by_kind(pending).items():
                    remote = self._handlers.get(kind)
                    if remote is not None:
                        await remote.redis(group)
            except REDIS_ERRORS as exc:
                self._circuit.failed(exc)
            else:
                ids = [r["id"] for r in pending]
                await self._db.run(lambda con: con.execute(DONE, ids), None)
                done = True
        if len(seen) < BATCH:  # else the next poll goes on from here
            self._since = rows[0]["polled_at"]
        self._trust.polled(started, l2_clean=(not pending or done) and len(seen) < BATCH)
        return len(pending) if done else 0

    async def prune(self) -> int:
        """Delete repairs done more than an hour ago (a background job)."""
        status: str = await self._db.run(lambda con: con.execute(PRUNE, timedelta(hours=1), self._keyspace), None)
        return int(status.rpartition(" ")[2] or 0)


def _by_kind(rows: Sequence[Record]) -> dict[str, list[Repair]]:
    grouped: dict[str, list[Repair]] = {}
    for r in rows:
        grouped.setdefault(r["kind"], []).append(Repair(r["kind"], r["tenant_id"], r["entity_id"], r["version"]))
    return grouped
