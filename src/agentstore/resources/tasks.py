"""Tasks: SQL, row → proto, the lease-based queue, and the TaskService servicer.

The queue lives entirely in PostgreSQL. ClaimTask picks with `FOR UPDATE SKIP LOCKED`, so
concurrent claimers never wait on each other or hand out one task twice. Every claim bumps the
task's `lease_token` (a fencing token): renew, complete and fail must present the current token
and an unexpired lease, and the check happens under the row lock in the same transaction as the
change. Redis only carries the "a task may be ready" hint that wakes waiting claimers.

Lock order, to keep deadlocks out: a claim locks its agent, then skips locked tasks; everything
else locks tasks first, then agents (sorted by id).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2

from agentstore import metrics
from agentstore.cache.entity import EntityCache, Loaded
from agentstore.context import Principal, Role, cache_bypassed, current_principal, current_request
from agentstore.db import Database, Record
from agentstore.errors import ApiError, etag_mismatch, invalid_argument, invalid_field, not_found
from agentstore.jobs import all_tenant_ids
from agentstore.query import FieldKind, FieldSpec, PageTokenCodec, SortKey
from agentstore.query.listing import ListSpec
from agentstore.redis.bus import ProcessBus, Subscriber
from agentstore.resources import agents as agents_module
from agentstore.resources.audit import AuditEntry, audit_args, with_audit, write_audits
from agentstore.resources.fields import (
    check_text,
    etag_matches,
    etag_of,
    json_to_struct,
    parse_id,
    struct_to_json,
    to_timestamp,
)
from agentstore.resources.idempotency import created_resource_gone, parse_request_id, replay_create
from agentstore.resources.masks import update_mask_paths
from agentstore.resources.paging import fetch_page
from agentstore.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

log = logging.getLogger(__name__)

ENTITY = "task"
READY = "task-ready"  # bus kind of the "a task may be claimable in tenant <key>" hint

# `{t}` is a table alias with its dot ("t."), or "" (COLUMNS).
COLUMNS_OF = """{t}id, {t}title, {t}description, {t}status, {t}priority, {t}payload::text AS payload,
       {t}result::text AS result, {t}error, {t}required_capabilities, {t}assigned_agent_id, {t}attempts,
       {t}max_attempts, {t}lease_token, {t}lease_expire_time, {t}create_time, {t}update_time, {t}start_time,
       {t}complete_time, {t}version"""
COLUMNS = COLUMNS_OF.format(t="")
T_COLUMNS = COLUMNS_OF.format(t="t.")

GET_TASK = f"SELECT {COLUMNS} FROM tasks WHERE tenant_id = $1 AND id = $2"
# One round trip: the function sets the tenant for its statement, then selects (migration 0005).
READ_TASKS = f"SELECT {COLUMNS} FROM agentstore_read_tasks($1, $2::uuid[])"

# The lease check reads PostgreSQL's clock, not ours.
GET_TASK_FOR_UPDATE = f"""
SELECT {COLUMNS}, (lease_expire_time > now()) AS lease_live
FROM tasks WHERE tenant_id = $1 AND id = $2 FOR UPDATE
"""

INSERT_TASK = f"""
INSERT INTO tasks (tenant_id, id, title, description, priority, payload, required_capabilities, max_attempts)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
RETURNING {COLUMNS}
"""

# One statement for up to 1000 tasks and their `task.create` audit rows. Capability lists travel
# as JSON arrays because PostgreSQL arrays must be rectangular and cannot be unnested one row at a
# time. The audit JSON is built from each inserted row by agentstore_task_json (migration 0006),
# equal to what write_audits would encode, without a round of Python encoding per task; the
# audit rows keep the order of the request. Only the columns PostgreSQL generates come back: the
# response is built from the validated request (created_tasks), not decoded from 1,000 rows.
INSERT_TASKS = with_audit(
    """input AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::int[])
                  WITH ORDINALITY AS u(id, title, description, priority, payload, caps, max_attempts, n)
), written AS (
    INSERT INTO tasks (tenant_id, id, title, description, priority, payload, required_capabilities, max_attempts)
    SELECT $1, u.id, u.title, u.description, u.priority, u.payload::jsonb,
           ARRAY(SELECT jsonb_array_elements_text(u.caps::jsonb)), u.max_attempts
    FROM input AS u
    ORDER BY u.n
    RETURNING id, status, attempts, create_time, update_time, version, agentstore_task_json(tasks) AS audit_after
)""",
    action="task.create",
    entity_type=ENTITY,
    returning="id, status, attempts, create_time, update_time, version",
    first_param=9,
    join="JOIN input AS u ON u.id = w.id ORDER BY u.n",
)

CLAIM_REQUEST_IDS = """
INSERT INTO create_requests (tenant_id, request_id, resource_type, resource_id)
SELECT $1, u.request_id, 'task', u.resource_id FROM unnest($2::uuid[], $3::uuid[]) AS u(request_id, resource_id)
ON CONFLICT (tenant_id, request_id) DO NOTHING
RETURNING request_id
"""

EARLIER_REQUESTS = f"""
SELECT r.request_id, r.resource_type, {T_COLUMNS}
FROM create_requests r LEFT JOIN tasks t ON t.tenant_id = r.tenant_id AND t.id = r.resource_id
WHERE r.tenant_id = $1 AND r.request_id = ANY($2::uuid[])
"""

UPDATE_TASK = f"""
UPDATE tasks
SET title = $3, description = $4, priority = $5, payload = $6::jsonb, required_capabilities = $7,
    max_attempts = $8, version = version + 1, update_time = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {COLUMNS}
"""

CANCEL_TASK = f"""
UPDATE tasks
SET status = 'CANCELLED', lease_expire_time = NULL, complete_time = now(), version = version + 1, update_time = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {COLUMNS}
"""

DELETE_TASK = f"DELETE FROM tasks WHERE tenant_id = $1 AND id = $2 RETURNING {COLUMNS}"

LOCK_AGENT = f"SELECT {agents_module.COLUMNS} FROM agents WHERE tenant_id = $1 AND id = $2 FOR NO KEY UPDATE"

LOCK_AGENTS = f"""
SELECT {agents_module.COLUMNS} FROM agents WHERE tenant_id = $1 AND id = ANY($2::uuid[])
ORDER BY id FOR NO KEY UPDATE
"""

# The highest-priority, oldest PENDING task the agent can do; locked rows are skipped, so
# concurrent claimers each get a different task without waiting.
CLAIM_TASK = f"""
WITH candidate AS (
    SELECT id FROM tasks
    WHERE tenant_id = $1 AND status = 'PENDING' AND required_capabilities <@ $3::text[]
    ORDER BY priority DESC, create_time, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET status = 'RUNNING', assigned_agent_id = $2, attempts = t.attempts + 1, lease_token = t.lease_token + 1,
    lease_expire_time = now() + $4::interval, start_time = coalesce(t.start_time, now()),
    update_time = now(), version = t.version + 1
FROM candidate
WHERE t.tenant_id = $1 AND t.id = candidate.id
RETURNING {T_COLUMNS}
"""

RENEW_LEASE = f"""
UPDATE tasks SET lease_expire_time = now() + $3::interval, version = version + 1, update_time = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {COLUMNS}
"""

COMPLETE_TASK = f"""
UPDATE tasks
SET status = 'SUCCEEDED', result = $3::jsonb, lease_expire_time = NULL, complete_time = now(),
    version = version + 1, update_time = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {COLUMNS}
"""

# A retryable failure with attempts left goes back to the queue; anything else fails for good.
FAIL_TASK = f"""
UPDATE tasks
SET status = CASE WHEN $4 AND attempts < max_attempts THEN 'PENDING' ELSE 'FAILED' END,
    error = $3, lease_expire_time = NULL,
    complete_time = CASE WHEN $4 AND attempts < max_attempts THEN NULL ELSE now() END,
    version = version + 1, update_time = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {COLUMNS}
"""

# Overdue leases of one tenant: back to PENDING, or FAILED once every attempt was used.
EXPIRE_LEASES = f"""
WITH overdue AS (
    SELECT id FROM tasks
    WHERE tenant_id = $1 AND status = 'RUNNING' AND lease_expire_time <= now()
    ORDER BY lease_expire_time
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET status = CASE WHEN t.attempts >= t.max_attempts THEN 'FAILED' ELSE 'PENDING' END,
    error = 'lease expired', lease_expire_time = NULL,
    complete_time = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
    version = t.version + 1, update_time = now()
FROM overdue
WHERE t.tenant_id = $1 AND t.id = overdue.id
RETURNING {T_COLUMNS}
"""

# The agent's status follows the tasks it holds: BUSY with a RUNNING task, IDLE without. OFFLINE
# and ERROR are left alone. Runs after the caller locked the agent (a fresh snapshot, so tasks
# other transactions committed meanwhile count), and bumps the version only on a real change.
SETTLE_AGENT = f"""
UPDATE agents a
SET status = n.status, completed_task_count = a.completed_task_count + $3,
    version = a.version + (n.status <> a.status)::int,
    update_time = CASE WHEN n.status <> a.status THEN now() ELSE a.update_time END
FROM (
    SELECT CASE
        WHEN b.status NOT IN ('IDLE', 'BUSY') THEN b.status
        WHEN EXISTS (SELECT 1 FROM tasks t
                     WHERE t.tenant_id = $1 AND t.assigned_agent_id = $2 AND t.status = 'RUNNING') THEN 'BUSY'
        ELSE 'IDLE'
    END AS status
    FROM agents b WHERE b.tenant_id = $1 AND b.id = $2
) n
WHERE a.tenant_id = $1 AND a.id = $2
RETURNING {agents_module.COLUMNS_OF.format(a="a.")}, a.completed_task_count
"""

STATUS_TO_DB: dict[int, str] = {
    task_pb2.TASK_STATUS_PENDING: "PENDING",
    task_pb2.TASK_STATUS_RUNNING: "RUNNING",
    task_pb2.TASK_STATUS_SUCCEEDED: "SUCCEEDED",
    task_pb2.TASK_STATUS_FAILED: "FAILED",
    task_pb2.TASK_STATUS_CANCELLED: "CANCELLED",
}
STATUS_FROM_DB: dict[str, int] = {v: k for k, v in STATUS_TO_DB.items()}
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")

_STATUS_LITERALS = {**{f"TASK_STATUS_{v}": v for v in STATUS_TO_DB.values()}, **{v: v for v in STATUS_TO_DB.values()}}
FILTER_FIELDS = {
    "title": FieldSpec("title", FieldKind.STRING),
    "status": FieldSpec("status", FieldKind.ENUM, _STATUS_LITERALS),
    "assigned_agent_id": FieldSpec("assigned_agent_id", FieldKind.UUID),
    "priority": FieldSpec("priority", FieldKind.INTEGER),
    "attempts": FieldSpec("attempts", FieldKind.INTEGER),
    "max_attempts": FieldSpec("max_attempts", FieldKind.INTEGER),
    "required_capabilities": FieldSpec(
        "required_capabilities",
        FieldKind.STRING_ARRAY,
        contains_sql="agentstore_scoped_tags(tenant_id, required_capabilities) @> agentstore_scoped_tags($1, {value})",
    ),
    "payload": FieldSpec(
        "payload",
        FieldKind.JSON,
        contains_sql="agentstore_scoped_json(tenant_id, payload) @> agentstore_scoped_json($1, {value})",
    ),
    "create_time": FieldSpec("create_time", FieldKind.TIMESTAMP),
    "update_time": FieldSpec("update_time", FieldKind.TIMESTAMP),
    "start_time": FieldSpec("start_time", FieldKind.TIMESTAMP),
    "complete_time": FieldSpec("complete_time", FieldKind.TIMESTAMP),
    "lease_expire_time": FieldSpec("lease_expire_time", FieldKind.TIMESTAMP),
}
_ID_KEY = SortKey("id", "id", FieldKind.UUID)
LIST_SPEC = ListSpec(
    resource="tasks",
    select=f"SELECT {COLUMNS} FROM tasks WHERE tenant_id = $1",
    fields=FILTER_FIELDS,
    sort_keys={
        "priority": SortKey("priority", "priority", FieldKind.INTEGER),
        "create_time": SortKey("create_time", "create_time", FieldKind.TIMESTAMP),
        "update_time": SortKey("update_time", "update_time", FieldKind.TIMESTAMP),
    },
    default_order="create_time",
    tie_breaker=_ID_KEY,
)

# Search: $2 is the query. The rank is an integer so that it can key a page token: a title equal
# to the query adds 10^9, above any ts_rank (normalization 32 keeps it below 1, scaled to 10^9).
_TSQUERY = "websearch_to_tsquery('english', $2)"
SEARCH_SPEC = ListSpec(
    resource="tasks:search",
    select=f"""
SELECT * FROM (
    SELECT tenant_id, {COLUMNS},
           (CASE WHEN lower(title) = lower($2) THEN 1000000000 ELSE 0 END
            + (ts_rank(search, {_TSQUERY}, 32) * 1000000000)::bigint) AS rank
    FROM tasks
    WHERE tenant_id = $1
      AND agentstore_scoped_search(tenant_id, search) @@ agentstore_scoped_query($1, {_TSQUERY})
) AS ranked WHERE true""",
    fields=FILTER_FIELDS,
    sort_keys={"rank": SortKey("rank", "rank", FieldKind.INTEGER)},
    default_order="rank desc",
    tie_breaker=_ID_KEY,
    base_params=2,
)

UPDATABLE = ("title", "description", "priority", "payload", "required_capabilities", "max_attempts", "status")
OUTPUT_ONLY = (
    "id",
    "result",
    "assigned_agent_id",
    "attempts",
    "lease_expire_time",
    "create_time",
    "update_time",
    "start_time",
    "complete_time",
    "etag",
    "error",
)

MAX_TITLE = 512
MAX_DESCRIPTION = 65536
MAX_LABEL = 128
MAX_CAPABILITIES = 100
MAX_ERROR = 4096
MAX_QUERY = 1000
MAX_BATCH = 1000
DEFAULT_MAX_ATTEMPTS = 3
MIN_LEASE = timedelta(seconds=1)
MAX_LEASE = timedelta(hours=1)
MAX_CLAIM_WAIT = 60.0
_WAIT_POLL = 1.0  # waiting claimers re-check this often even if no hint arrives


def task_from_row(row: Record) -> task_pb2.Task:
    task = task_pb2.Task(
        id=str(row["id"]),
        title=row["title"],
        description=row["description"],
        status=STATUS_FROM_DB[row["status"]],  # type: ignore[arg-type]
        priority=row["priority"],
        required_capabilities=row["required_capabilities"],
        assigned_agent_id=str(row["assigned_agent_id"]) if row["assigned_agent_id"] is not None else "",
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        etag=etag_of(row["version"]),
        error=row["error"],
    )
    json_to_struct(row["payload"], task.payload)
    json_to_struct(row["result"], task.result)
    to_timestamp(row["lease_expire_time"], task.lease_expire_time)
    to_timestamp(row["create_time"], task.create_time)
    to_timestamp(row["update_time"], task.update_time)
    to_timestamp(row["start_time"], task.start_time)
    to_timestamp(row["complete_time"], task.complete_time)
    return task


def created_tasks(
    creates: Sequence[task_service_pb2.CreateTaskRequest],
    columns: Sequence[Sequence[Any]],
    indexes: Sequence[int],
    rows: Sequence[Record],
) -> dict[uuid.UUID, task_pb2.Task]:
    """The tasks BatchCreateTasks inserted, as task_from_row would read them back, built from the
    validated creates (`columns`: id, then column_values, by create) and the columns PostgreSQL
    generated (INSERT_TASKS). Copying the request's payload Struct and sharing one Timestamp per
    distinct time costs a fraction of decoding 1,000 rows (JSON payloads, datetimes).
    test_audit_json checks the result against the stored rows."""
    stamps: dict[Any, timestamp_pb2.Timestamp] = {}

    def stamp(value: Any) -> timestamp_pb2.Timestamp:
        ts = stamps.get(value)
        if ts is None:
            ts = stamps[value] = timestamp_pb2.Timestamp()
            ts.FromDatetime(value)
        return ts

    by_id = {row["id"]: row for row in rows}
    tasks: dict[uuid.UUID, task_pb2.Task] = {}
    for i in indexes:
        task_id = columns[0][i]
        row = by_id[task_id]
        task = creates[i].task
        tasks[task_id] = task_pb2.Task(
            id=str(task_id),
            title=task.title,
            description=task.description,
            status=STATUS_FROM_DB[row["status"]],  # type: ignore[arg-type]
            priority=task.priority,
            payload=task.payload if task.payload.fields else None,
            required_capabilities=task.required_capabilities,
            attempts=row["attempts"],
            max_attempts=columns[6][i],
            create_time=stamp(row["create_time"]),
            update_time=stamp(row["update_time"]),
            etag=etag_of(row["version"]),
        )
    if len(tasks) != len(indexes):
        raise RuntimeError(f"BatchCreateTasks inserted {len(rows)} rows for {len(indexes)} tasks")
    return tasks


def task_not_found(task_id: uuid.UUID | str) -> ApiError:
    return not_found("TASK_NOT_FOUND", f"no task {task_id}")


def lease_lost(task_id: uuid.UUID) -> ApiError:
    return ApiError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
        f"the lease on task {task_id} is not held with this token: it expired, was claimed again, or the task ended",
    )


def column_values(task: task_pb2.Task, prefix: str = "task") -> list[Any]:
    """The stored form of the writable fields, validated, in INSERT/UPDATE order."""
    check_text(task.title, f"{prefix}.title", max_len=MAX_TITLE, required=True)
    check_text(task.description, f"{prefix}.description", max_len=MAX_DESCRIPTION)
    if len(task.required_capabilities) > MAX_CAPABILITIES:
        raise invalid_field(f"{prefix}.required_capabilities", f"at most {MAX_CAPABILITIES} capabilities")
    for i, capability in enumerate(task.required_capabilities):
        check_text(capability, f"{prefix}.required_capabilities[{i}]", max_len=MAX_LABEL, required=True)
    max_attempts = task.max_attempts or DEFAULT_MAX_ATTEMPTS
    if not 1 <= max_attempts <= 100:
        raise invalid_field(f"{prefix}.max_attempts", "must be between 1 and 100")
    return [
        task.title,
        task.description,
        task.priority,
        struct_to_json(task.payload, f"{prefix}.payload"),
        list(task.required_capabilities),
        max_attempts,
    ]


def lease_of(duration: duration_pb2.Duration, field: str, present: bool) -> timedelta:
    if not present:
        raise invalid_field(field, "is required")
    try:
        value = duration.ToTimedelta()
    except (ValueError, OverflowError):
        raise invalid_field(field, "out of range") from None
    if not MIN_LEASE <= value <= MAX_LEASE:
        raise invalid_field(field, "must be between 1 second and 1 hour")
    return value


def update_paths(request: task_service_pb2.UpdateTaskRequest) -> list[str]:
    mask = request.update_mask if request.HasField("update_mask") else None
    return update_mask_paths(request.task, mask, UPDATABLE, OUTPUT_ONLY)


def merge_for_update(stored: task_pb2.Task, patch: task_pb2.Task, paths: Sequence[str]) -> task_pb2.Task:
    merged = task_pb2.Task()
    merged.CopyFrom(stored)
    for path in paths:
        if path == "status":
            continue
        merged.ClearField(path)  # type: ignore[arg-type]
        if path == "required_capabilities":
            merged.required_capabilities.extend(patch.required_capabilities)
        elif path == "payload":
            merged.payload.CopyFrom(patch.payload)
        else:
            setattr(merged, path, getattr(patch, path))
    return merged


AgentChange = tuple[Record, Record]  # (before, after) of an agent row whose status changed
CompletionHook = Callable[[asyncpg.Connection, Principal, uuid.UUID, uuid.UUID, uuid.UUID, int], Awaitable[Any]]


class _Waiters:
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


class TaskService(task_service_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        db: Database,
        page_tokens: PageTokenCodec,
        agent_cache: EntityCache,
        bus: ProcessBus,
        task_cache: EntityCache | None = None,
        on_completion: CompletionHook | None = None,
        after_completion: Callable[[uuid.UUID, Any], Awaitable[None]] | None = None,
    ) -> None:
        self._db = db
        self._page_tokens = page_tokens
        self._agent_cache = agent_cache
        self._bus = bus
        # GetTask reads through it; every write below replaces the entry after commit.
        self._task_cache = task_cache
        # Achievements: awarded inside CompleteTask's transaction, published after its commit.
        self._on_completion = on_completion
        self._after_completion = after_completion
        self._waiters = _Waiters()
        bus.subscribe(READY, Subscriber(on_message=self._waiters.on_hint, on_resync=self._waiters.wake_all))
        # Test hook: awaited inside CompleteTask's transaction, after every write, before COMMIT.
        self.before_commit: Callable[[asyncpg.Connection], Awaitable[None]] | None = None

    # --- shared steps ---------------------------------------------------------------------------

    async def _settle_agents(
        self, con: asyncpg.Connection, tenant: uuid.UUID, locked: Sequence[Record], completed: int = 0
    ) -> list[AgentChange]:
        """Recompute BUSY/IDLE of agents the caller locked; the (before, after) of real changes."""
        return (await self._settle(con, tenant, locked, completed))[0]

    async def _settle(
        self, con: asyncpg.Connection, tenant: uuid.UUID, locked: Sequence[Record], completed: int
    ) -> tuple[list[AgentChange], list[Record]]:
        """As _settle_agents, plus every settled agent row (with its completed_task_count)."""
        changes: list[AgentChange] = []
        settled: list[Record] = []
        for before in locked:
            after = await con.fetchrow(SETTLE_AGENT, tenant, before["id"], completed)
            if after is None:
                continue
            settled.append(after)
            if after["version"] != before["version"]:
                changes.append((before, after))
        return changes, settled

    @staticmethod
    def _agent_audits(changes: Sequence[AgentChange]) -> list[AuditEntry]:
        return [
            (
                "agent.update",
                agents_module.ENTITY,
                after["id"],
                agents_module.agent_from_row(before),
                agents_module.agent_from_row(after),
            )
            for before, after in changes
        ]

    async def _published(self, tenant: uuid.UUID, changes: Sequence[AgentChange]) -> None:
        """After commit: the agent cache tiers take the agents' new versions."""
        for _, after in changes:
            agent = agents_module.agent_from_row(after)
            await self._agent_cache.written((tenant, after["id"]), after["version"], agent.SerializeToString())

    async def _task_written(self, tenant: uuid.UUID, row: Record) -> task_pb2.Task:
        """After commit: the response, and the task cache tiers replaced with it."""
        task = task_from_row(row)
        if self._task_cache is not None:
            await self._task_cache.written((tenant, row["id"]), row["version"], task.SerializeToString())
        return task

    async def _ready(self, tenant: uuid.UUID) -> None:
        """After commit: a task may be claimable. Wakes local waiters now, others through Redis."""
        self._waiters.wake(tenant)
        await self._bus.notify(READY, str(tenant))

    async def _lock_held_task(
        self, con: asyncpg.Connection, tenant: uuid.UUID, task_id: uuid.UUID, token: int
    ) -> Record:
        row = await con.fetchrow(GET_TASK_FOR_UPDATE, tenant, task_id)
        if row is None:
            raise task_not_found(task_id)
        if row["status"] != "RUNNING" or row["lease_token"] != token or not row["lease_live"]:
            raise lease_lost(task_id)
        return row

    async def _lock_agent_of(self, con: asyncpg.Connection, tenant: uuid.UUID, row: Record) -> list[Record]:
        if row["assigned_agent_id"] is None:
            return []
        agent = await con.fetchrow(LOCK_AGENT, tenant, row["assigned_agent_id"])
        return [agent] if agent is not None else []

    # --- standard methods -----------------------------------------------------------------------

    # Answers wire bytes (cached or freshly encoded); the server's serializer passes them through.
    async def GetTask(self, request: task_service_pb2.GetTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        tenant = current_principal().tenant_id
        task_id = parse_id(request.id)

        async def load() -> Loaded:
            rows = await self._db.read(READ_TASKS, tenant, [task_id])
            metrics.DB_LOADS.labels(ENTITY).inc()
            return (rows[0]["version"], task_from_row(rows[0]).SerializeToString()) if rows else None

        if self._task_cache is None or cache_bypassed():
            loaded = await load()
            payload = loaded[1] if loaded is not None else None
        else:
            payload = await self._task_cache.get((tenant, task_id), load)
        if payload is None:
            raise task_not_found(task_id)
        return payload

    async def ListTasks(
        self, request: task_service_pb2.ListTasksRequest, context: Any
    ) -> task_service_pb2.ListTasksResponse:
        page, next_token = await fetch_page(
            self._db,
            self._page_tokens,
            LIST_SPEC,
            current_principal().tenant_id,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
        )
        return task_service_pb2.ListTasksResponse(tasks=[task_from_row(r) for r in page], next_page_token=next_token)

    async def SearchTasks(
        self, request: task_service_pb2.SearchTasksRequest, context: Any
    ) -> task_service_pb2.SearchTasksResponse:
        tenant = current_principal().tenant_id
        query = request.query.strip()
        check_text(query, "query", max_len=MAX_QUERY, required=True)
        # The page token is bound to the query as well as the filter.
        digest = hashlib.sha256(query.encode()).hexdigest()[:32]
        spec = dataclasses.replace(SEARCH_SPEC, resource=f"{SEARCH_SPEC.resource}:{digest}")
        page, next_token = await fetch_page(
            self._db,
            self._page_tokens,
            spec,
            tenant,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            base=(tenant, query),
        )
        return task_service_pb2.SearchTasksResponse(tasks=[task_from_row(r) for r in page], next_page_token=next_token)

    async def CreateTask(self, request: task_service_pb2.CreateTaskRequest, context: Any) -> task_pb2.Task:
        principal = current_principal()
        tenant = principal.tenant_id
        if not request.HasField("task"):
            raise invalid_field("task", "is required")
        values = column_values(request.task)
        request_id = parse_request_id(request.request_id)

        async def create(con: asyncpg.Connection) -> tuple[Record, bool]:
            new_id = uuid.uuid4()
            earlier = await replay_create(con, tenant, request_id, ENTITY, new_id, GET_TASK)
            if earlier is not None:
                return earlier, False
            row = await con.fetchrow(INSERT_TASK, tenant, new_id, *values)
            await write_audits(con, principal, tenant, [("task.create", ENTITY, new_id, None, task_from_row(row))])
            return row, True

        row, created = await self._db.run(create, tenant)
        if created:
            await self._ready(tenant)
        return task_from_row(row)

    async def BatchCreateTasks(
        self, request: task_service_pb2.BatchCreateTasksRequest, context: Any
    ) -> task_service_pb2.BatchCreateTasksResponse:
        principal = current_principal()
        tenant = principal.tenant_id
        if not request.requests:
            raise invalid_field("requests", "at least one create is required")
        if len(request.requests) > MAX_BATCH:
            raise invalid_field("requests", f"at most {MAX_BATCH} creates per call")
        columns: list[list[Any]] = [[] for _ in range(7)]  # id + the six writable columns
        request_ids: list[uuid.UUID | None] = []
        for i, create in enumerate(request.requests):
            if not create.HasField("task"):
                raise invalid_field(f"requests[{i}].task", "is required")
            values = column_values(create.task, f"requests[{i}].task")
            values[4] = json.dumps(values[4])
            columns[0].append(uuid.uuid4())
            for c, value in enumerate(values, start=1):
                columns[c].append(value)
            rid = create.request_id
            request_ids.append(parse_id(rid, f"requests[{i}].request_id") if rid else None)
        given = [r for r in request_ids if r is not None]
        if len(set(given)) != len(given):
            raise invalid_field("requests", "request_id values must be distinct within one batch")

        async def create_all(con: asyncpg.Connection) -> list[task_pb2.Task]:
            earlier: dict[uuid.UUID, Record] = {}
            if given:
                pairs = [(r, columns[0][i]) for i, r in enumerate(request_ids) if r is not None]
                claimed = {
                    r["request_id"]
                    for r in await con.fetch(CLAIM_REQUEST_IDS, tenant, [p[0] for p in pairs], [p[1] for p in pairs])
                }
                unclaimed = [p[0] for p in pairs if p[0] not in claimed]
                if unclaimed:
                    for row in await con.fetch(EARLIER_REQUESTS, tenant, unclaimed):
                        if row["resource_type"] != ENTITY:
                            raise invalid_argument(
                                "REQUEST_ID_REUSED",
                                f"a request_id was already used to create a {row['resource_type']}",
                                [("requests", "a request_id was used for another kind of resource")],
                            )
                        if row["id"] is None:
                            raise created_resource_gone(ENTITY, field="requests")
                        earlier[row["request_id"]] = row
            fresh = [i for i, r in enumerate(request_ids) if r is None or r not in earlier]
            inserted: dict[uuid.UUID, task_pb2.Task] = {}
            if fresh:
                rows = await con.fetch(
                    INSERT_TASKS, tenant, *([col[i] for i in fresh] for col in columns), *audit_args(principal)
                )
                inserted = created_tasks(request.requests, columns, fresh, rows)
            return [
                task_from_row(earlier[r]) if r is not None and r in earlier else inserted[columns[0][i]]
                for i, r in enumerate(request_ids)
            ]

        tasks = await self._db.run(create_all, tenant)
        await self._ready(tenant)
        return task_service_pb2.BatchCreateTasksResponse(tasks=tasks)

    async def UpdateTask(self, request: task_service_pb2.UpdateTaskRequest, context: Any) -> task_pb2.Task:
        principal = current_principal()
        tenant = principal.tenant_id
        if not request.HasField("task"):
            raise invalid_field("task", "is required")
        task_id = parse_id(request.task.id, "task.id")
        paths = update_paths(request)
        cancel = "status" in paths
        if cancel and request.task.status != task_pb2.TASK_STATUS_CANCELLED:
            raise invalid_field("task.status", "may only be set to TASK_STATUS_CANCELLED")

        async def update(con: asyncpg.Connection) -> tuple[Record, list[AgentChange]]:
            row = await con.fetchrow(GET_TASK_FOR_UPDATE, tenant, task_id)
            if row is None:
                raise task_not_found(task_id)
            if not etag_matches(request.task.etag, row["version"]):
                raise etag_mismatch(ENTITY)
            if cancel and row["status"] in FINISHED:
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "TASK_FINISHED",
                    f"task {task_id} already ended as {row['status']}",
                )
            before = task_from_row(row)
            updated = row
            if paths != ["status"]:  # a pure cancel writes the row once, below
                merged = merge_for_update(before, request.task, paths)
                updated = await con.fetchrow(UPDATE_TASK, tenant, task_id, *column_values(merged))
            changes: list[AgentChange] = []
            if cancel:
                locked = await self._lock_agent_of(con, tenant, row) if row["status"] == "RUNNING" else []
                updated = await con.fetchrow(CANCEL_TASK, tenant, task_id)
                changes = await self._settle_agents(con, tenant, locked)
            await write_audits(
                con,
                principal,
                tenant,
                [("task.update", ENTITY, task_id, before, task_from_row(updated)), *self._agent_audits(changes)],
            )
            return updated, changes

        row, changes = await self._db.run(update, tenant)
        await self._published(tenant, changes)
        return await self._task_written(tenant, row)

    async def DeleteTask(self, request: task_service_pb2.DeleteTaskRequest, context: Any) -> empty_pb2.Empty:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.id)

        async def delete(con: asyncpg.Connection) -> tuple[int, list[AgentChange]]:
            row = await con.fetchrow(GET_TASK_FOR_UPDATE, tenant, task_id)
            if row is None:
                raise task_not_found(task_id)
            if not etag_matches(request.etag, row["version"]):
                raise etag_mismatch(ENTITY)
            locked = await self._lock_agent_of(con, tenant, row) if row["status"] == "RUNNING" else []
            await con.execute(DELETE_TASK, tenant, task_id)
            changes = await self._settle_agents(con, tenant, locked)
            await write_audits(
                con,
                principal,
                tenant,
                [("task.delete", ENTITY, task_id, task_from_row(row), None), *self._agent_audits(changes)],
            )
            return row["version"], changes

        version, changes = await self._db.run(delete, tenant)
        await self._published(tenant, changes)
        if self._task_cache is not None:
            # A tombstone one version past the deleted row: no reader can put the old row back.
            await self._task_cache.written((tenant, task_id), version + 1, None)
        return empty_pb2.Empty()

    # --- the queue ------------------------------------------------------------------------------

    async def ClaimTask(
        self, request: task_service_pb2.ClaimTaskRequest, context: Any
    ) -> task_service_pb2.ClaimTaskResponse:
        principal = current_principal()
        tenant = principal.tenant_id
        agent_id = parse_id(request.agent_id, "agent_id")
        lease = lease_of(request.lease_duration, "lease_duration", request.HasField("lease_duration"))
        ctx = current_request()
        remaining = ctx.time_remaining() if ctx is not None else None
        give_up = time.monotonic() + min(MAX_CLAIM_WAIT, remaining if remaining is not None else MAX_CLAIM_WAIT)

        async def claim(con: asyncpg.Connection) -> tuple[Record, list[AgentChange]] | None:
            agent = await con.fetchrow(LOCK_AGENT, tenant, agent_id)
            if agent is None:
                raise agents_module.agent_not_found(agent_id)
            if agent["status"] not in ("IDLE", "BUSY"):
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "AGENT_UNAVAILABLE",
                    f"agent {agent_id} is {agent['status']}; only IDLE or BUSY agents claim tasks",
                )
            row = await con.fetchrow(CLAIM_TASK, tenant, agent_id, agent["capabilities"], lease)
            if row is None:
                return None
            changes = await self._settle_agents(con, tenant, [agent])
            await write_audits(
                con,
                principal,
                tenant,
                [("task.claim", ENTITY, row["id"], None, task_from_row(row)), *self._agent_audits(changes)],
            )
            return row, changes

        while True:
            claimed = await self._db.run(claim, tenant)
            if claimed is not None:
                row, changes = claimed
                await self._published(tenant, changes)
                task = await self._task_written(tenant, row)
                return task_service_pb2.ClaimTaskResponse(task=task, lease_token=row["lease_token"])
            left = give_up - time.monotonic()
            if not request.wait or left <= 0.05:
                raise not_found("NO_TASK_AVAILABLE", "no PENDING task this agent can do")
            await self._waiters.wait(tenant, min(left - 0.05, _WAIT_POLL))

    async def RenewTaskLease(self, request: task_service_pb2.RenewTaskLeaseRequest, context: Any) -> task_pb2.Task:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.task_id, "task_id")
        lease = lease_of(request.lease_duration, "lease_duration", request.HasField("lease_duration"))

        async def renew(con: asyncpg.Connection) -> Record:
            row = await self._lock_held_task(con, tenant, task_id, request.lease_token)
            updated = await con.fetchrow(RENEW_LEASE, tenant, task_id, lease)
            await write_audits(
                con,
                principal,
                tenant,
                [("task.renew_lease", ENTITY, task_id, task_from_row(row), task_from_row(updated))],
            )
            return updated

        return await self._task_written(tenant, await self._db.run(renew, tenant))

    async def CompleteTask(self, request: task_service_pb2.CompleteTaskRequest, context: Any) -> task_pb2.Task:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.task_id, "task_id")
        result = struct_to_json(request.result, "result")

        async def complete(con: asyncpg.Connection) -> tuple[Record, list[AgentChange], Any]:
            row = await self._lock_held_task(con, tenant, task_id, request.lease_token)
            locked = await self._lock_agent_of(con, tenant, row)
            updated = await con.fetchrow(COMPLETE_TASK, tenant, task_id, result)
            changes, settled = await self._settle(con, tenant, locked, completed=1)
            awards = None
            if settled and self._on_completion is not None:
                # Rules fire on the agent's new completion count; the agent row lock makes it exact.
                agent = settled[0]
                awards = await self._on_completion(
                    con, principal, tenant, agent["id"], task_id, agent["completed_task_count"]
                )
            await write_audits(
                con,
                principal,
                tenant,
                [
                    ("task.complete", ENTITY, task_id, task_from_row(row), task_from_row(updated)),
                    *self._agent_audits(changes),
                ],
            )
            if self.before_commit is not None:
                await self.before_commit(con)
            return updated, changes, awards

        row, changes, awards = await self._db.run(complete, tenant)
        await self._published(tenant, changes)
        task = await self._task_written(tenant, row)
        if awards and self._after_completion is not None:
            await self._after_completion(tenant, awards)
        return task

    async def FailTask(self, request: task_service_pb2.FailTaskRequest, context: Any) -> task_pb2.Task:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.task_id, "task_id")
        check_text(request.error, "error", max_len=MAX_ERROR)

        async def fail(con: asyncpg.Connection) -> tuple[Record, list[AgentChange]]:
            row = await self._lock_held_task(con, tenant, task_id, request.lease_token)
            locked = await self._lock_agent_of(con, tenant, row)
            updated = await con.fetchrow(FAIL_TASK, tenant, task_id, request.error, request.retryable)
            changes = await self._settle_agents(con, tenant, locked)
            await write_audits(
                con,
                principal,
                tenant,
                [
                    ("task.fail", ENTITY, task_id, task_from_row(row), task_from_row(updated)),
                    *self._agent_audits(changes),
                ],
            )
            return updated, changes

        row, changes = await self._db.run(fail, tenant)
        await self._published(tenant, changes)
        task = await self._task_written(tenant, row)
        if row["status"] == "PENDING":
            await self._ready(tenant)
        return task

    # --- lease expiry ---------------------------------------------------------------------------

    async def expire_leases(self, tenant: uuid.UUID, batch: int = 500) -> int:
        """Return the tenant's overdue tasks to the queue (or fail them); how many were expired."""
        principal = Principal(tenant_id=tenant, key_id=None, role=Role.ADMIN, system=True)

        async def expire(con: asyncpg.Connection) -> tuple[list[Record], list[AgentChange]]:
            rows = await con.fetch(EXPIRE_LEASES, tenant, batch)
            if not rows:
                return [], []
            holders = sorted({r["assigned_agent_id"] for r in rows if r["assigned_agent_id"] is not None})
            locked = list(await con.fetch(LOCK_AGENTS, tenant, holders)) if holders else []
            changes = await self._settle_agents(con, tenant, locked)
            await write_audits(
                con,
                principal,
                tenant,
                [("task.lease_expired", ENTITY, r["id"], None, task_from_row(r)) for r in rows]
                + self._agent_audits(changes),
            )
            return list(rows), changes

        rows, changes = await self._db.run(expire, tenant)
        await self._published(tenant, changes)
        for row in rows:
            await self._task_written(tenant, row)
        if any(r["status"] == "PENDING" for r in rows):
            await self._ready(tenant)
        return len(rows)

    async def sweep(self) -> int:
        """One pass over every tenant's overdue leases."""
        expired = 0
        for tenant in await all_tenant_ids(self._db):
            while (count := await self.expire_leases(tenant)) >= 500:
                expired += count
            expired += count
        return expired
