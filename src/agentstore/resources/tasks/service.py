"""TaskService: the standard methods, BatchCreateTasks and SearchTasks here; the queue RPCs are
TaskQueue's (queue.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from typing import Any

import asyncpg
import grpc
from google.protobuf import empty_pb2

from agentstore.cache.entity import EntityCache
from agentstore.context import current_principal
from agentstore.db import Database, Record
from agentstore.errors import ApiError, invalid_argument, invalid_field
from agentstore.resources import agents
from agentstore.resources.audit import audit_args
from agentstore.resources.fields import check_text, parse_id
from agentstore.resources.idempotency import created_resource_gone
from agentstore.resources.paging import Pages
from agentstore.resources.spec import Create, delete, lock_for_update, run
from agentstore.resources.tasks.model import (
    FINISHED,
    LIST_SPEC,
    MAX_BATCH,
    MAX_QUERY,
    SEARCH_SPEC,
    TASK,
    WRITE_SET,
    column_values,
    created_tasks,
    task_from_row,
    validate,
)
from agentstore.resources.tasks.queue import TaskQueue
from agentstore.resources.tasks.sql import (
    CLAIM_REQUEST_IDS,
    EARLIER_REQUESTS,
    ENTITY,
    INSERT_TASKS,
)
from agentstore.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

# An update of the writable fields that may also cancel ($9): the status goes to CANCELLED and
# the lease ends.
UPDATE_TASK = TASK.audited_update(
    f"""{WRITE_SET},
        status = CASE WHEN $9 THEN 'CANCELLED' ELSE t.status END,
        lease_expire_time = CASE WHEN $9 THEN NULL ELSE t.lease_expire_time END,
        complete_time = CASE WHEN $9 THEN now() ELSE t.complete_time END""",
    "update",
)


class TaskService(task_service_pb2_grpc.TaskServiceServicer):
    """Servicers only unpack the request, run one unit of work and build the response. Reads and
    writes of one task answer wire bytes (cached, or the one encoding of a written row)."""

    def __init__(
        self, db: Database, pages: Pages, cache: EntityCache, agent_cache: EntityCache, queue: TaskQueue
    ) -> None:
        self._db = db
        self._pages = pages
        self._cache = cache
        self._agents = agent_cache
        self._queue = queue

    async def GetTask(self, request: task_service_pb2.GetTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        key = (current_principal().tenant_id, parse_id(request.id))
        return self._cache.cached(key) or await self._cache.require(key)

    async def ListTasks(
        self, request: task_service_pb2.ListTasksRequest, context: Any
    ) -> task_service_pb2.ListTasksResponse:
        items, next_token = await self._pages.fetch(LIST_SPEC, current_principal().tenant_id, request, task_from_row)
        return task_service_pb2.ListTasksResponse(tasks=items, next_page_token=next_token)

    async def SearchTasks(
        self, request: task_service_pb2.SearchTasksRequest, context: Any
    ) -> task_service_pb2.SearchTasksResponse:
        tenant = current_principal().tenant_id
        query = request.query.strip()
        check_text(query, "query", max_len=MAX_QUERY, required=True)
        # The page token is bound to the query as well as the filter.
        digest = hashlib.sha256(query.encode()).hexdigest()[:32]
        spec = dataclasses.replace(SEARCH_SPEC, resource=f"{SEARCH_SPEC.resource}:{digest}")
        items, next_token = await self._pages.fetch(spec, tenant, request, task_from_row, base=(tenant, query))
        return task_service_pb2.SearchTasksResponse(tasks=items, next_page_token=next_token)

    async def CreateTask(self, request: task_service_pb2.CreateTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        principal = current_principal()
        payload = await run(self._db, self._cache, principal, Create.of(TASK, request))
        await self._queue.ready(principal.tenant_id)
        return payload

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
            validate(create.task, prefix=f"requests[{i}].task")
            values = column_values(create.task)
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
        await self._queue.ready(tenant)
        return task_service_pb2.BatchCreateTasksResponse(tasks=tasks)

    async def UpdateTask(self, request: task_service_pb2.UpdateTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        principal = current_principal()
        tenant = principal.tenant_id
        if not request.HasField("task"):
            raise invalid_field("task", "is required")
        patch = request.task
        task_id = parse_id(patch.id, "task.id")
        paths = TASK.update_paths(patch, request.update_mask if request.HasField("update_mask") else None)
        validate(patch, paths)
        cancel = "status" in paths

        async def update(con: asyncpg.Connection) -> tuple[Record, list[Record]]:
            row = await lock_for_update(con, TASK, tenant, task_id, patch.etag)
            if cancel and row["status"] in FINISHED:
                raise ApiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "TASK_FINISHED",
                    f"task {task_id} already ended as {row['status']}",
                )
            # A cancel ends the holder's lease: its agent is settled in the same transaction.
            holders = [row["assigned_agent_id"]] if cancel and row["status"] == "RUNNING" else []
            await agents.lock_agents(con, tenant, holders)
            merged = TASK.merged(task_from_row(row), patch, paths)
            updated = await con.fetchrow(
                UPDATE_TASK,
                tenant,
                task_id,
                *column_values(merged),  # type: ignore[arg-type]
                cancel,
                row["audit_before"],
                *audit_args(principal),
            )
            return updated, await agents.settle_agents(con, principal, holders)

        row, settled = await self._db.run(update, tenant)
        await agents.agents_settled(self._agents, tenant, settled)
        return await self._cache.written(tenant, row)

    async def DeleteTask(self, request: task_service_pb2.DeleteTaskRequest, context: Any) -> empty_pb2.Empty:
        principal = current_principal()
        tenant = principal.tenant_id
        task_id = parse_id(request.id)

        async def remove(con: asyncpg.Connection) -> tuple[Record, list[Record]]:
            row = await delete(con, TASK, principal, task_id, request.etag)
            # A RUNNING task's holder no longer holds it: settle the agent (task, then agent order).
            holders = [row["assigned_agent_id"]] if row["status"] == "RUNNING" and row["assigned_agent_id"] else []
            await agents.lock_agents(con, tenant, holders)
            return row, await agents.settle_agents(con, principal, holders)

        row, settled = await self._db.run(remove, tenant)
        await agents.agents_settled(self._agents, tenant, settled)
        await self._cache.deleted((tenant, task_id), row["version"])
        return empty_pb2.Empty()

    # --- the queue (queue.py) -------------------------------------------------------------------

    async def ClaimTask(self, request: task_service_pb2.ClaimTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        return await self._queue.claim(request)

    async def RenewTaskLease(self, request: task_service_pb2.RenewTaskLeaseRequest, context: Any) -> bytes:  # type: ignore[override]
        return await self._queue.renew(request)

    async def CompleteTask(self, request: task_service_pb2.CompleteTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        return await self._queue.complete(request)

    async def FailTask(self, request: task_service_pb2.FailTaskRequest, context: Any) -> bytes:  # type: ignore[override]
        return await self._queue.fail(request)
