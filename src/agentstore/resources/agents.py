"""Agents: SQL, row → proto, the AgentService servicer, and the agent status settlement the task
queue asks for (only this module writes agent rows)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
from google.protobuf import empty_pb2

from agentstore.cache.entity import EntityCache
from agentstore.context import Principal, current_principal
from agentstore.db import ConstraintReason, Database, Record, register_constraint
from agentstore.deps import Add, Deps, Resource
from agentstore.errors import ApiError, invalid_argument, invalid_field, not_found
from agentstore.query import FieldKind, FieldSpec
from agentstore.query.listing import ID_KEY, ListSpec, filter_fields, json_field, sort_keys, tags_field
from agentstore.resources.audit import audit_args, with_audit
from agentstore.resources.fields import (
    MAX_BATCH_IDS,
    check_text,
    etag_of,
    from_timestamp,
    json_to_struct,
    parse_id,
    struct_to_json,
    to_timestamp,
)
from agentstore.resources.leaderboard import Leaderboard, leaderboard
from agentstore.resources.paging import Pages
from agentstore.resources.spec import Create, ResourceSpec, Update, delete, entity_cache, run
from agentstore.resources.wire import repeated_message_bytes
from agentstore.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc

ENTITY = "agent"

# `{a}` is a table alias with its dot ("a."), or "" (COLUMNS).
COLUMNS_OF = """{a}id, {a}name, {a}role, {a}kind, {a}status, {a}capabilities, {a}metadata::text AS metadata,
       {a}last_heartbeat_time, {a}create_time, {a}update_time, {a}version"""
COLUMNS = COLUMNS_OF.format(a="")

# The queue's lock on the agents whose status it settles: id order, so that two settlements never
# deadlock; FOR NO KEY UPDATE does not block inserts that reference the agent.
LOCK_AGENTS = """
SELECT id, status, capabilities FROM agents WHERE tenant_id = $1 AND id = ANY($2::uuid[])
ORDER BY id FOR NO KEY UPDATE
"""

# An agent's status follows the tasks it holds: BUSY with a RUNNING task, IDLE without. OFFLINE
# and ERROR are left alone. Runs after the caller locked the agents (LOCK_AGENTS), in a fresh
# snapshot, so tasks other transactions committed meanwhile count; bumps the version, and writes
# an audit row, only on a real change. $3 is added to completed_task_count.
SETTLE_AGENTS = with_audit(
    f"""before AS (
    SELECT b.id, b.status, agentstore_agent_json(b) AS audit FROM agents AS b
    WHERE b.tenant_id = $1 AND b.id = ANY($2::uuid[])
), next AS (
    SELECT b.id, b.status AS old_status, b.audit,
           CASE
               WHEN b.status NOT IN ('IDLE', 'BUSY') THEN b.status
               WHEN EXISTS (SELECT 1 FROM tasks t
                            WHERE t.tenant_id = $1 AND t.assigned_agent_id = b.id AND t.status = 'RUNNING') THEN 'BUSY'
               ELSE 'IDLE'
           END AS status
    FROM before AS b
), written AS (
    UPDATE agents AS a
    SET status = n.status, completed_task_count = a.completed_task_count + $3,
        version = a.version + (n.status <> n.old_status)::int,
        update_time = CASE WHEN n.status <> n.old_status THEN now() ELSE a.update_time END
    FROM next AS n
    WHERE a.tenant_id = $1 AND a.id = n.id
    RETURNING {COLUMNS_OF.format(a="a.")}, a.completed_task_count, n.status <> n.old_status AS changed,
              n.audit AS audit_before, agentstore_agent_json(a) AS audit_after
)""",
    action="agent.update",
    entity_type=ENTITY,
    returning=f"{COLUMNS}, completed_task_count, changed",
    first_param=4,
    before="w.audit_before",
    join="WHERE w.changed",
)

STATUS_TO_DB: dict[int, str] = {
    agent_pb2.AGENT_STATUS_IDLE: "IDLE",
    agent_pb2.AGENT_STATUS_BUSY: "BUSY",
    agent_pb2.AGENT_STATUS_OFFLINE: "OFFLINE",
    agent_pb2.AGENT_STATUS_ERROR: "ERROR",
}
STATUS_FROM_DB: dict[str, int] = {v: k for k, v in STATUS_TO_DB.items()}

# Filterable fields (ListAgentsRequest.filter documents the same subset); capabilities and metadata
# containment go through the tenant-scoped GIN indexes of migration 0001.
_STATUS_LITERALS = {**{f"AGENT_STATUS_{v}": v for v in STATUS_TO_DB.values()}, **{v: v for v in STATUS_TO_DB.values()}}
FILTER_FIELDS = filter_fields(
    name=FieldKind.STRING,
    role=FieldKind.STRING,
    kind=FieldKind.STRING,
    status=FieldSpec("status", FieldKind.ENUM, _STATUS_LITERALS),
    capabilities=tags_field("capabilities"),
    metadata=json_field("metadata"),
    create_time=FieldKind.TIMESTAMP,
    update_time=FieldKind.TIMESTAMP,
    last_heartbeat_time=FieldKind.TIMESTAMP,
)
LIST_SPEC = ListSpec(
    resource="agents",
    select=f"SELECT {COLUMNS} FROM agents WHERE tenant_id = $1",
    fields=FILTER_FIELDS,
    sort_keys=sort_keys(name=FieldKind.STRING, create_time=FieldKind.TIMESTAMP, update_time=FieldKind.TIMESTAMP),
    default_order="create_time",
    tie_breaker=ID_KEY,
)

UPDATABLE = ("name", "role", "kind", "status", "capabilities", "metadata", "last_heartbeat_time")
OUTPUT_ONLY = ("id", "create_time", "update_time", "etag")

MAX_NAME = 256
MAX_LABEL = 128
MAX_CAPABILITIES = 100

register_constraint(
    "agents_name_key",
    ConstraintReason(
        grpc.StatusCode.ALREADY_EXISTS,
        "AGENT_NAME_TAKEN",
        "the tenant already has an agent with this name",
        "agent.name",
    ),
)


def agent_from_row(row: Record) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=str(row["id"]),
        name=row["name"],
        role=row["role"],
        kind=row["kind"],
        status=STATUS_FROM_DB[row["status"]],  # type: ignore[arg-type]
        capabilities=row["capabilities"],
        etag=etag_of(row["version"]),
    )
    json_to_struct(row["metadata"], agent.metadata)
    to_timestamp(row["last_heartbeat_time"], agent.last_heartbeat_time)
    to_timestamp(row["create_time"], agent.create_time)
    to_timestamp(row["update_time"], agent.update_time)
    return agent


def agent_not_found(agent_id: uuid.UUID | str) -> ApiError:
    return not_found("AGENT_NOT_FOUND", f"no agent {agent_id}")


def validate(agent: agent_pb2.Agent, paths: Sequence[str], creating: bool) -> None:
    """Check the fields named in `paths` (every writable one for a create): before any transaction."""
    if "name" in paths:
        check_text(agent.name, "agent.name", max_len=MAX_NAME, required=True)
    if "role" in paths:
        check_text(agent.role, "agent.role", max_len=MAX_LABEL)
    if "kind" in paths:
        check_text(agent.kind, "agent.kind", max_len=MAX_LABEL)
    if "status" in paths and agent.status not in STATUS_TO_DB:
        if agent.status != agent_pb2.AGENT_STATUS_UNSPECIFIED:
            raise invalid_field("agent.status", "unknown status")
        if not creating:  # a create starts IDLE; an update may not unset the status
            raise invalid_field("agent.status", "cannot be set to AGENT_STATUS_UNSPECIFIED")
    if "capabilities" in paths:
        if len(agent.capabilities) > MAX_CAPABILITIES:
            raise invalid_field("agent.capabilities", f"at most {MAX_CAPABILITIES} capabilities")
        for i, capability in enumerate(agent.capabilities):
            check_text(capability, f"agent.capabilities[{i}]", max_len=MAX_LABEL, required=True)
    if "metadata" in paths:
        struct_to_json(agent.metadata, "agent.metadata")
    if "last_heartbeat_time" in paths and agent.HasField("last_heartbeat_time"):
        from_timestamp(agent.last_heartbeat_time, "agent.last_heartbeat_time")


def column_values(agent: agent_pb2.Agent) -> list[Any]:
    """The stored form of the writable fields (validated already), in the order INSERT/UPDATE take them."""
    heartbeat = (
        from_timestamp(agent.last_heartbeat_time, "agent.last_heartbeat_time")
        if agent.HasField("last_heartbeat_time")
        else None
    )
    return [
        agent.name,
        agent.role,
        agent.kind,
        STATUS_TO_DB.get(agent.status, "IDLE"),
        list(agent.capabilities),
        struct_to_json(agent.metadata, "agent.metadata"),
        heartbeat,
    ]


AGENT = ResourceSpec(
    entity=ENTITY,
    table="agents",
    columns_of=COLUMNS_OF,
    from_row=agent_from_row,
    not_found=agent_not_found,
    read_function="agentstore_read_agents",
    json_function="agentstore_agent_json",
    validate=validate,
    insert_columns="name, role, kind, status, capabilities, metadata, last_heartbeat_time",
    insert_values="$3, $4, $5, $6, $7, $8::jsonb, $9",
    create_values=column_values,
    update_set="""name = $3, role = $4, kind = $5, status = $6, capabilities = $7, metadata = $8::jsonb,
        last_heartbeat_time = $9""",
    update_values=column_values,
    creatable=UPDATABLE,
    updatable=UPDATABLE,
    output_only=OUTPUT_ONLY,
)


# --- the status settlement the task queue asks for ------------------------------------------------


async def lock_agents(con: asyncpg.Connection, tenant: uuid.UUID, agent_ids: Sequence[uuid.UUID]) -> list[Record]:
    """Lock the tenant's agents among `agent_ids` (id, status, capabilities), in id order."""
    if not agent_ids:
        return []
    return list(await con.fetch(LOCK_AGENTS, tenant, sorted(set(agent_ids))))


async def settle_agents(
    con: asyncpg.Connection, principal: Principal, agent_ids: Sequence[uuid.UUID], completed: int = 0
) -> list[Record]:
    """BUSY or IDLE, from the tasks each agent now holds, for agents the caller locked
    (lock_agents); `completed` is added to their completed_task_count. One statement; each agent
    whose status changed gets its audit row in it. The settled rows (with completed_task_count and
    `changed`); pass them to `AgentCache.settled` after commit."""
    if not agent_ids:
        return []
    return list(await con.fetch(SETTLE_AGENTS, principal.tenant_id, list(agent_ids), completed, *audit_args(principal)))


def agent_cache(deps: Deps) -> EntityCache:
    """The one agent cache of a server, and its one loader."""
    return entity_cache(deps, AGENT)


async def agents_settled(cache: EntityCache, tenant: uuid.UUID, settled: Sequence[Record]) -> None:
    """After commit: the cache tiers take the new versions of agents whose status changed."""
    for row in settled:
        if row["changed"]:
            await cache.written(tenant, row)


# --- the servicer ---------------------------------------------------------------------------------


class AgentService(agent_service_pb2_grpc.AgentServiceServicer):
    """Servicers only unpack the request, run one unit of work and build the response."""

    def __init__(self, db: Database, pages: Pages, cache: EntityCache, board: Leaderboard) -> None:
        self._db = db
        self._pages = pages
        self._cache = cache
        # Deleting an agent deletes its awards: its tenant's leaderboard is rebuilt from PostgreSQL.
        self._board = board

    # Reads and writes answer wire bytes (cached, or the one encoding of a written row); the
    # server's serializer passes them through.
    async def GetAgent(self, request: agent_service_pb2.GetAgentRequest, context: Any) -> bytes:  # type: ignore[override]
        key = (current_principal().tenant_id, parse_id(request.id))
        # An L1 hit answers without awaiting anything (no coroutine).
        return self._cache.cached(key) or await self._cache.require(key)

    async def BatchGetAgents(  # type: ignore[override]
        self, request: agent_service_pb2.BatchGetAgentsRequest, context: Any
    ) -> bytes:
        tenant = current_principal().tenant_id
        if len(request.ids) > MAX_BATCH_IDS:
            raise invalid_argument("INVALID_ID", f"at most {MAX_BATCH_IDS} ids", [("ids", f"at most {MAX_BATCH_IDS}")])
        ids = [parse_id(value, f"ids[{i}]") for i, value in enumerate(request.ids)]
        found = await self._cache.get_many(tenant, ids)
        missing = [agent_id for agent_id in ids if agent_id not in found]
        if missing:
            raise agent_not_found(missing[0])
        return repeated_message_bytes(1, (found[agent_id] for agent_id in ids))

    async def ListAgents(
        self, request: agent_service_pb2.ListAgentsRequest, context: Any
    ) -> agent_service_pb2.ListAgentsResponse:
        items, next_token = await self._pages.fetch(LIST_SPEC, current_principal().tenant_id, request, agent_from_row)
        return agent_service_pb2.ListAgentsResponse(agents=items, next_page_token=next_token)

    async def CreateAgent(self, request: agent_service_pb2.CreateAgentRequest, context: Any) -> bytes:  # type: ignore[override]
        return await run(self._db, self._cache, current_principal(), Create.of(AGENT, request))

    async def UpdateAgent(self, request: agent_service_pb2.UpdateAgentRequest, context: Any) -> bytes:  # type: ignore[override]
        return await run(self._db, self._cache, current_principal(), Update.of(AGENT, request))

    async def DeleteAgent(self, request: agent_service_pb2.DeleteAgentRequest, context: Any) -> empty_pb2.Empty:
        principal = current_principal()
        agent_id = parse_id(request.id)
        tenant = principal.tenant_id
        row = await self._db.run(lambda con: delete(con, AGENT, principal, agent_id, request.etag), tenant)
        await self._cache.deleted((tenant, agent_id), row["version"])
        await self._board.invalidate(tenant)
        return empty_pb2.Empty()


def register(add: Add, deps: Deps) -> None:
    add(
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server,
        AgentService(deps.db, deps.pages, deps.shared(agent_cache), deps.shared(leaderboard)),
    )


RESOURCE = Resource.of(agent_service_pb2, "AgentService", register)
