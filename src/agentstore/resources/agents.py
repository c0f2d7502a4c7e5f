"""Agents: SQL, row → proto, and the AgentService servicer."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc
from google.protobuf import empty_pb2

from agentstore import metrics
from agentstore.cache.entity import EntityCache
from agentstore.cache.l1 import Key
from agentstore.context import cache_bypassed, current_principal
from agentstore.db import ConstraintReason, Database, Record, register_constraint
from agentstore.db.coalesce import PointReads
from agentstore.errors import etag_mismatch, invalid_argument, invalid_field, not_found
from agentstore.query import FieldKind, FieldSpec, PageTokenCodec, SortKey
from agentstore.query.listing import ListSpec
from agentstore.resources.audit import audit_args, with_audit, write_audit
from agentstore.resources.fields import (
    MAX_BATCH_IDS,
    check_text,
    etag_matches,
    etag_of,
    from_timestamp,
    json_to_struct,
    parse_id,
    struct_to_json,
    to_timestamp,
)
from agentstore.resources.idempotency import parse_request_id, replay_create
from agentstore.resources.masks import update_mask_paths
from agentstore.resources.paging import fetch_page
from agentstore.resources.wire import repeated_message_bytes
from agentstore.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc

ENTITY = "agent"

# `{a}` is a table alias with its dot ("a."), or "" (COLUMNS).
COLUMNS_OF = """{a}id, {a}name, {a}role, {a}kind, {a}status, {a}capabilities, {a}metadata::text AS metadata,
       {a}last_heartbeat_time, {a}create_time, {a}update_time, {a}version"""
COLUMNS = COLUMNS_OF.format(a="")

GET_AGENT = f"SELECT {COLUMNS} FROM agents WHERE tenant_id = $1 AND id = $2"

GET_AGENT_FOR_UPDATE = f"{GET_AGENT} FOR UPDATE"

# One round trip: the function sets the tenant for its statement, then selects (migration 0005).
READ_AGENTS = f"SELECT {COLUMNS} FROM agentstore_read_agents($1, $2::uuid[])"

# A write and its audit row in one statement (with_audit; the JSON is built by
# agentstore_agent_json, migration 0006). $10-$12: the audit's actor, key id and request id.
INSERT_AGENT = with_audit(
    f"""written AS (
    INSERT INTO agents (tenant_id, id, name, role, kind, status, capabilities, metadata, last_heartbeat_time)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9)
    RETURNING {COLUMNS}, agentstore_agent_json(agents) AS audit_after
)""",
    action="agent.create",
    entity_type=ENTITY,
    returning=COLUMNS,
    first_param=10,
)

# The caller holds the row lock (GET_AGENT_FOR_UPDATE); `before` reads the row as it was, since
# every part of one statement sees the same snapshot.
UPDATE_AGENT = with_audit(
    f"""before AS (
    SELECT agentstore_agent_json(a) AS audit FROM agents AS a WHERE a.tenant_id = $1 AND a.id = $2
), written AS (
    UPDATE agents
    SET name = $3, role = $4, kind = $5, status = $6, capabilities = $7, metadata = $8::jsonb,
        last_heartbeat_time = $9, version = version + 1, update_time = now()
    WHERE tenant_id = $1 AND id = $2
    RETURNING {COLUMNS}, agentstore_agent_json(agents) AS audit_after
)""",
    action="agent.update",
    entity_type=ENTITY,
    returning=COLUMNS,
    first_param=10,
    before="(SELECT audit FROM before)",
)

DELETE_AGENT = f"DELETE FROM agents WHERE tenant_id = $1 AND id = $2 RETURNING {COLUMNS}"

STATUS_TO_DB: dict[int, str] = {
    agent_pb2.AGENT_STATUS_IDLE: "IDLE",
    agent_pb2.AGENT_STATUS_BUSY: "BUSY",
    agent_pb2.AGENT_STATUS_OFFLINE: "OFFLINE",
    agent_pb2.AGENT_STATUS_ERROR: "ERROR",
}
STATUS_FROM_DB: dict[str, int] = {v: k for k, v in STATUS_TO_DB.items()}

# Filterable fields (ListAgentsRequest.filter documents the same subset).
_STATUS_LITERALS = {**{f"AGENT_STATUS_{v}": v for v in STATUS_TO_DB.values()}, **{v: v for v in STATUS_TO_DB.values()}}
FILTER_FIELDS = {
    "name": FieldSpec("name", FieldKind.STRING),
    "role": FieldSpec("role", FieldKind.STRING),
    "kind": FieldSpec("kind", FieldKind.STRING),
    "status": FieldSpec("status", FieldKind.ENUM, _STATUS_LITERALS),
    # Containment goes through the tenant-scoped GIN indexes of migration 0001 ($1 is the tenant).
    "capabilities": FieldSpec(
        "capabilities",
        FieldKind.STRING_ARRAY,
        contains_sql="agentstore_scoped_tags(tenant_id, capabilities) @> agentstore_scoped_tags($1, {value})",
    ),
    "metadata": FieldSpec(
        "metadata",
        FieldKind.JSON,
        contains_sql="agentstore_scoped_json(tenant_id, metadata) @> agentstore_scoped_json($1, {value})",
    ),
    "create_time": FieldSpec("create_time", FieldKind.TIMESTAMP),
    "update_time": FieldSpec("update_time", FieldKind.TIMESTAMP),
    "last_heartbeat_time": FieldSpec("last_heartbeat_time", FieldKind.TIMESTAMP),
}
_ID_KEY = SortKey("id", "id", FieldKind.UUID)
LIST_SPEC = ListSpec(
    resource="agents",
    select=f"SELECT {COLUMNS} FROM agents WHERE tenant_id = $1",
    fields=FILTER_FIELDS,
    sort_keys={
        "name": SortKey("name", "name", FieldKind.STRING),
        "create_time": SortKey("create_time", "create_time", FieldKind.TIMESTAMP),
        "update_time": SortKey("update_time", "update_time", FieldKind.TIMESTAMP),
    },
    default_order="create_time",
    tie_breaker=_ID_KEY,
)

UPDATABLE = ("name", "role", "kind", "status", "capabilities", "metadata", "last_heartbeat_time")
OUTPUT_ONLY = ("id", "create_time", "update_time", "etag")
_MESSAGE_FIELDS = ("metadata", "last_heartbeat_time")

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


def agent_not_found(agent_id: uuid.UUID | str) -> Exception:
    return not_found("AGENT_NOT_FOUND", f"no agent {agent_id}")


def column_values(agent: agent_pb2.Agent) -> list[Any]:
    """The stored form of the mutable fields, validated, in the order INSERT/UPDATE take them."""
    check_text(agent.name, "agent.name", max_len=MAX_NAME, required=True)
    check_text(agent.role, "agent.role", max_len=MAX_LABEL)
    check_text(agent.kind, "agent.kind", max_len=MAX_LABEL)
    if agent.status not in STATUS_TO_DB and agent.status != agent_pb2.AGENT_STATUS_UNSPECIFIED:
        raise invalid_field("agent.status", "unknown status")
    if len(agent.capabilities) > MAX_CAPABILITIES:
        raise invalid_field("agent.capabilities", f"at most {MAX_CAPABILITIES} capabilities")
    for i, capability in enumerate(agent.capabilities):
        check_text(capability, f"agent.capabilities[{i}]", max_len=MAX_LABEL, required=True)
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


def merge_for_update(stored: agent_pb2.Agent, patch: agent_pb2.Agent, paths: Sequence[str]) -> agent_pb2.Agent:
    merged = agent_pb2.Agent()
    merged.CopyFrom(stored)
    for path in paths:
        merged.ClearField(path)  # type: ignore[arg-type]
        if path == "capabilities":
            merged.capabilities.extend(patch.capabilities)
        elif path in _MESSAGE_FIELDS:
            if patch.HasField(path):  # type: ignore[arg-type]
                getattr(merged, path).CopyFrom(getattr(patch, path))
        else:
            setattr(merged, path, getattr(patch, path))
    if merged.status == agent_pb2.AGENT_STATUS_UNSPECIFIED:
        raise invalid_field("agent.status", "cannot be set to AGENT_STATUS_UNSPECIFIED")
    return merged


def update_paths(request: agent_service_pb2.UpdateAgentRequest) -> list[str]:
    """The fields to write: the mask's, `*` for all, or (no mask) every field set in the agent."""
    mask = request.update_mask if request.HasField("update_mask") else None
    return update_mask_paths(request.agent, mask, UPDATABLE, OUTPUT_ONLY)


class AgentService(agent_service_pb2_grpc.AgentServiceServicer):
    """Servicers only unpack the request, run one unit of work and build the response."""

    def __init__(
        self,
        db: Database,
        page_tokens: PageTokenCodec,
        cache: EntityCache,
        on_deleted: Callable[[uuid.UUID], Awaitable[None]] | None = None,
    ) -> None:
        self._db = db
        # After an agent's delete commits (its achievements went with it): e.g. drop the
        # tenant's cached leaderboard so that the next read rebuilds it from PostgreSQL.
        self._on_deleted = on_deleted
        self._page_tokens = page_tokens
        self._cache = cache
        self._point_reads: PointReads[tuple[int, bytes]] = PointReads(self._fetch_agents)

    async def _fetch_agents(self, tenant: uuid.UUID, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, bytes]]:
        """(version, wire bytes) of the tenant's agents among `ids`, in one query."""
        rows = await self._db.read(READ_AGENTS, tenant, ids)
        metrics.DB_LOADS.labels(ENTITY).inc()
        return {
            uuid.UUID(bytes=row["id"].bytes): (row["version"], agent_from_row(row).SerializeToString()) for row in rows
        }

    async def _written(self, row: Record) -> agent_pb2.Agent:
        """After commit: the response, and the cache tiers replaced with it."""
        agent = agent_from_row(row)
        await self._cache.written((current_principal().tenant_id, row["id"]), row["version"], agent.SerializeToString())
        return agent

    # Answers wire bytes (cached or freshly encoded); the server's serializer passes them through.
    async def GetAgent(self, request: agent_service_pb2.GetAgentRequest, context: Any) -> bytes:  # type: ignore[override]
        tenant = current_principal().tenant_id
        agent_id = parse_id(request.id)
        if cache_bypassed():
            loaded = await self._point_reads.get(tenant, agent_id)
            payload = loaded[1] if loaded is not None else None
        else:
            # An L1 hit answers without awaiting anything (no coroutine, no closure).
            key = (tenant, agent_id)
            payload = self._cache.cached(key)
            if payload is None:
                payload = await self._cache.get(key, functools.partial(self._point_reads.get, tenant, agent_id))
        if payload is None:
            raise agent_not_found(agent_id)
        return payload

    async def BatchGetAgents(  # type: ignore[override]
        self, request: agent_service_pb2.BatchGetAgentsRequest, context: Any
    ) -> bytes:
        tenant = current_principal().tenant_id
        if len(request.ids) > MAX_BATCH_IDS:
            raise invalid_argument("INVALID_ID", f"at most {MAX_BATCH_IDS} ids", [("ids", f"at most {MAX_BATCH_IDS}")])
        keys = [(tenant, parse_id(value, f"ids[{i}]")) for i, value in enumerate(request.ids)]

        async def load_many(missing: list[Key]) -> dict[Key, tuple[int, bytes]]:
            found = await self._fetch_agents(tenant, [key[1] for key in missing])
            return {(tenant, agent_id): value for agent_id, value in found.items()}

        if cache_bypassed():
            found = {key: value[1] for key, value in (await load_many(keys)).items()}
        else:
            found = await self._cache.get_many(keys, load_many)
        missing = [key[1] for key in keys if key not in found]
        if missing:
            raise agent_not_found(missing[0])
        return repeated_message_bytes(1, (found[key] for key in keys))

    async def ListAgents(
        self, request: agent_service_pb2.ListAgentsRequest, context: Any
    ) -> agent_service_pb2.ListAgentsResponse:
        principal = current_principal()
        page, next_token = await fetch_page(
            self._db,
            self._page_tokens,
            LIST_SPEC,
            principal.tenant_id,
            page_size=request.page_size,
            page_token=request.page_token,
            filter=request.filter,
            order_by=request.order_by,
        )
        return agent_service_pb2.ListAgentsResponse(
            agents=[agent_from_row(row) for row in page], next_page_token=next_token
        )

    async def CreateAgent(self, request: agent_service_pb2.CreateAgentRequest, context: Any) -> agent_pb2.Agent:
        principal = current_principal()
        if not request.HasField("agent"):
            raise invalid_field("agent", "is required")
        values = column_values(request.agent)
        request_id = parse_request_id(request.request_id)
        tenant = principal.tenant_id

        async def create(con: asyncpg.Connection) -> Record:
            new_id = uuid.uuid4()
            earlier = await replay_create(con, tenant, request_id, ENTITY, new_id, GET_AGENT)
            if earlier is not None:
                return earlier
            return await con.fetchrow(INSERT_AGENT, tenant, new_id, *values, *audit_args(principal))

        return await self._written(await self._db.run(create, tenant))

    async def UpdateAgent(self, request: agent_service_pb2.UpdateAgentRequest, context: Any) -> agent_pb2.Agent:
        principal = current_principal()
        if not request.HasField("agent"):
            raise invalid_field("agent", "is required")
        agent_id = parse_id(request.agent.id, "agent.id")
        paths = update_paths(request)
        tenant = principal.tenant_id

        async def update(con: asyncpg.Connection) -> Record:
            row = await con.fetchrow(GET_AGENT_FOR_UPDATE, tenant, agent_id)
            if row is None:
                raise agent_not_found(agent_id)
            if not etag_matches(request.agent.etag, row["version"]):
                raise etag_mismatch(ENTITY)
            merged = merge_for_update(agent_from_row(row), request.agent, paths)
            return await con.fetchrow(UPDATE_AGENT, tenant, agent_id, *column_values(merged), *audit_args(principal))

        return await self._written(await self._db.run(update, tenant))

    async def DeleteAgent(self, request: agent_service_pb2.DeleteAgentRequest, context: Any) -> empty_pb2.Empty:
        principal = current_principal()
        agent_id = parse_id(request.id)
        tenant = principal.tenant_id

        async def delete(con: asyncpg.Connection) -> Record:
            row = await con.fetchrow(DELETE_AGENT, tenant, agent_id)
            if row is None:
                raise agent_not_found(agent_id)
            # Raising rolls the delete back.
            if not etag_matches(request.etag, row["version"]):
                raise etag_mismatch(ENTITY)
            await write_audit(con, principal, tenant, "agent.delete", ENTITY, agent_id, agent_from_row(row), None)
            return row

        row = await self._db.run(delete, tenant)
        # A tombstone one version past the deleted row: no reader can put the old row back.
        await self._cache.written((tenant, agent_id), row["version"] + 1, None)
        if self._on_deleted is not None:
            await self._on_deleted(tenant)
        return empty_pb2.Empty()
