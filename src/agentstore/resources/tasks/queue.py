"""The lease-based work queue: claim, renew, complete, fail, and the sweep of expired leases.

The queue lives entirely in PostgreSQL. ClaimTask picks with `FOR UPDATE SKIP LOCKED`, so
concurrent claimers never wait on each other or hand out one task twice. Every claim bumps the
task's `lease_token` (a fencing token): renew, complete and fail must present the current token
and an unexpired lease, and the check happens under the row lock in the same transaction as the
change. The agent's BUSY/IDLE status is settled by the agents module in the same transaction.
Redis only carries the "a task may be ready" hint that wakes waiting claimers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc

from agentstore.cache.entity import EntityCache
from agentstore.context import Principal, Role, current_principal, current_request
from agentstore.db import Database, Record
from agentstore.errors import ApiError, not_found
from agentstore.jobs import all_tenant_ids
from agentstore.redis.bus import ProcessBus, Subscriber
from agentstore.resources import agents
from agentstore.resources.achievements import award_for_completion
from agentstore.resources.audit import audit_args
from agentstore.resources.fields import check_text, parse_id, struct_to_json
from agentstore.resources.leaderboard import Leaderboard
from agentstore.resources.tasks.model import MAX_ERROR, TASK, lease_lost, lease_of, task_not_found
from agentstore.resources.tasks.sql import CLAIM_TASK, EXPIRE_LEASES, LOCK_TASK
from agentstore.resources.wire import message_field, varint_field
from agentstore.v1 import task_service_pb2

READY = "task-ready"  # bus kind of the "a task may be claimable in tenant <key>" hint
MAX_CLAIM_WAIT = 60.0
_WAIT_POLL = 1.0  # waiting claimers re-check this often even if no hint arrives
EXPIRE_BATCH = 500

# The lease writes, each on a row LOCK_TASK locked, with an audit row whose `before` is the JSON
# LOCK_TASK read: the parameter after the ones shown ($1 tenant, $2 id).
RENEW_LEASE = TASK.audited_update("lease_expire_time = now() + $3::interval", "renew_lease")
COMPLETE_TASK = TASK.audited_update(
    "status = 'SUCCEEDED', result = $3::jsonb, lease_expire_time = NULL, complete_time = now()", "complete"
)
# A retryable failure ($4) with attempts left goes back to the queue; anything else fails for good.
FAIL_TASK = TASK.audited_update(
    """status = CASE WHEN $4 AND t.attempts < t.max_attempts THEN 'PENDING' ELSE 'FAILED' END, error = $3,
    lease_expire_time = NULL, complete_time = CASE WHEN $4 AND t.attempts < t.max_attempts THEN NULL ELSE now() END""",
    "fail",
)


class Waiters:
    """Per-tenant wake-ups for ClaimTask(wait=true): local writes and hints from other processes."""

    def __init__(self) -> None:
        self._events: dict[uuid.UUID, asyncio.Event] = {}
        self._counts: dict[uuid.UUID, int] = {}

    def wake(self, tenant: uuid.UUID) -> None:
        event = self._events.get(tenant)
        if event is not None:
            event.set()
            # Next waiters get a fresh event; everyone waiting on this one wakes and retries.
            self._events[tenant] = asyncio.Event()

    def on_hint(self, key: str) -> None:
        try:
            self.wake(uuid.UUID(key))
        except ValueError:
            pass

    def wake_all(self) -> None:
        for tenant in list(self._events):
            self.wake(tenant)

    async def wait(self, tenant: uuid.UUID, seconds: float) -> None:
        event = self._events.setdefault(tenant, asyncio.Event())
        self._counts[tenant] = self._counts.get(tenant, 0) + 1
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._counts[tenant] -= 1
            if not self._counts[tenant]:
                del self._counts[tenant]
                if self._events.get(tenant) is event and not event.is_set():
                    del self._events[tenant]


class TaskQueue:
    """The queue RPCs (TaskService delegates to it) and the lease sweeper."""

    def __init__(
        self, db: Database, tasks: EntityCache, agent_cache: EntityCache, bus: ProcessBus, board: Leaderboard
    ) -> None:
        self._db = db
        self._tasks = tasks
        self._agents = agent_cache
        self._bus = bus
        self._board = board
        self._waiters = Waiters()
        bus.subscribe(READY, Subscriber(on_message=self._waiters.on_hint, on_resync=self._waiters.wake_all))
        # Test hook: awaited inside CompleteTask's transaction, after every write, before COMMIT.
        self.before_commit: Callable[[asyncpg.Connection], Awaitable[None]] | None = None

    async def ready(self, tenant: uuid.UUID) -> None:
        """After commit: a task may be claimable. Wakes local waiters now, others through Redis."""
        self._waiters.wake(tenant)
        await self._bus.notify(READY, str(tenant))

    async def _lock_held(self, con: asyncpg.Connection, tenant: uuid.UUID, task_id: uuid.UUID, token: int) -> Record:
        """The task, locked, if `token` holds its live lease; else LEASE_LOST (NOT_FOUND if no task)."""
        row: Record | None = await con.fetchrow(LOCK_TASK, tenant, task_id)
        if row is None:
            raise task_not_found(task_id)
        if row["status"] != "RUNNING" or row["lease_token"] != token or not row["lease_live"]:
            raise lease_lost(task_id)
        return row

    async def _committed(self, tenant: uuid.UUID, row: Record, settled: list[Record]) -> bytes:
        """After commit: the agents' and the task's cache entries replaced; the task's wire bytes."""
        await agents.agents_settled(self._agents, tenant, settled)
        return await self._tasks.written(tenant, row)

    async def claim(self, request: task_service_pb2.ClaimTaskRequest) -> bytes:
        principal = current_principal()
        tenant = principal.tenant_id
        agent_id = parse_id(request.agent_id, "agent_id")
        lease = lease_of(request.lease_duration, "lease_duration", request.HasField("lease_duration"))
        ctx = current_request()
        remaining = ctx.time_remaining() if ctx is not None else None
        give_up = time.monotonic() + min(MAX_CLAIM_WAIT, remaining if remaining is not None else MAX_CLAIM_WAIT)

        async def claim(con: asyncpg.Connection) -> tuple[Record, list[Record]] | None:
            locked = await agents.lock_agents(con, tenant, [agent_id])
            if not locked:
                raise agents.agent_not_found(agent_id)
            agent = locked[0]
            if agent["status"] not in ("IDLE", "BUSY"):
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "AGENT_UNAVAILABLE",
                    f"agent {agent_id} is {agent['status']}; only IDLE or BUSY agents claim tasks",
                )
            row = await con.fetchrow(CLAIM_TASK, tenant, agent_id, agent["capabilities"], lease, *audit_args(principal))
            if row is None:
                return None
            return row, await agents.settle_agents(con, principal, [agent_id])

        while True:
            claimed = await self._db.run(claim, tenant)
            if claimed is not None:
                row, settled = claimed
                task = await self._committed(tenant, row, settled)
                # ClaimTaskResponse{task = 1, lease_token = 2}, around the task's one encoding.
                return message_field(1, task) + varint_field(2, row["lease_token"])
            left = give_up - time.monotonic()
            if not request.wait or left <= 0.05:
                raise not_found("NO_TASK_AVAILABLE", "no PENDING task this agent can do")
            await self._waiters.wait(tenant, min(left - 0.05, _WAIT_POLL))

    async def renew(self, request: task_service_pb2.RenewTaskLeaseRequest) -> bytes:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.task_id, "task_id")
        lease = lease_of(request.lease_duration, "lease_duration", request.HasField("lease_duration"))

        async def renew(con: asyncpg.Connection) -> Record:
            held = await self._lock_held(con, tenant, task_id, request.lease_token)
            return await con.fetchrow(RENEW_LEASE, tenant, task_id, lease, held["audit_before"], *audit_args(principal))

        return await self._tasks.written(tenant, await self._db.run(renew, tenant))

    async def complete(self, request: task_service_pb2.CompleteTaskRequest) -> bytes:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.task_id, "task_id")
        result = struct_to_json(request.result, "result")

        async def complete(con: asyncpg.Connection) -> tuple[Record, list[Record], Any]:
            held = await self._lock_held(con, tenant, task_id, request.lease_token)
            holders = [held["assigned_agent_id"]] if held["assigned_agent_id"] is not None else []
            await agents.lock_agents(con, tenant, holders)
            row = await con.fetchrow(
                COMPLETE_TASK, tenant, task_id, result, held["audit_before"], *audit_args(principal)
            )
            settled = await agents.settle_agents(con, principal, holders, completed=1)
            awards = None
            if settled:
                # Rules fire on the agent's new completion count; the agent row lock makes it exact.
                agent = settled[0]
                awards = await award_for_completion(
                    con, principal, tenant, agent["id"], task_id, agent["completed_task_count"]
                )
            if self.before_commit is not None:
                await self.before_commit(con)
            return row, settled, awards

        row, settled, awards = await self._db.run(complete, tenant)
        task = await self._committed(tenant, row, settled)
        if awards:
            await self._board.awarded(tenant, awards)
        return task

    async def fail(self, request: task_service_pb2.FailTaskRequest) -> bytes:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.task_id, "task_id")
        check_text(request.error, "error", max_len=MAX_ERROR)

        async def fail(con: asyncpg.Connection) -> tuple[Record, list[Record]]:
            held = await self._lock_held(con, tenant, task_id, request.lease_token)
            holders = [held["assigned_agent_id"]] if held["assigned_agent_id"] is not None else []
            await agents.lock_agents(con, tenant, holders)
            row = await con.fetchrow(
                FAIL_TASK,
                tenant,
                task_id,
                request.error,
                request.retryable,
                held["audit_before"],
                *audit_args(principal),
            )
            return row, await agents.settle_agents(con, principal, holders)

        row, settled = await self._db.run(fail, tenant)
        task = await self._committed(tenant, row, settled)
        if row["status"] == "PENDING":
            await self.ready(tenant)
        return task

    # --- lease expiry ---------------------------------------------------------------------------

    async def expire_leases(self, tenant: uuid.UUID, batch: int = EXPIRE_BATCH) -> int:
        """Return the tenant's overdue tasks to the queue (or fail them); how many were expired."""
        principal = Principal(tenant_id=tenant, key_id=None, role=Role.ADMIN, system=True)

        async def expire(con: asyncpg.Connection) -> tuple[list[Record], list[Record]]:
            rows = list(await con.fetch(EXPIRE_LEASES, tenant, batch, *audit_args(principal)))
            holders = sorted({r["assigned_agent_id"] for r in rows if r["assigned_agent_id"] is not None})
            await agents.lock_agents(con, tenant, holders)
            return rows, await agents.settle_agents(con, principal, holders)

        rows, settled = await self._db.run(expire, tenant)
        await agents.agents_settled(self._agents, tenant, settled)
        for row in rows:
            await self._tasks.written(tenant, row)
        if any(r["status"] == "PENDING" for r in rows):
            await self.ready(tenant)
        return len(rows)

    async def sweep(self) -> int:
        """One pass over every tenant's overdue leases."""
        expired = 0
        for tenant in await all_tenant_ids(self._db):
            while (count := await self.expire_leases(tenant)) >= EXPIRE_BATCH:
                expired += count
            expired += count
        return expired
