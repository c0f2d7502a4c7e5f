"""Audit logs: the one writer every mutation uses (in the mutation's own transaction), row → proto,
and the read-only AuditLogService servicer."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from google.protobuf.message import Message

from agentstore.context import Principal, current_principal, current_request
from agentstore.db import Record
from agentstore.deps import Add, Deps, Resource
from agentstore.query import FieldKind, SortKey
from agentstore.query.listing import ListSpec, filter_fields, sort_keys
from agentstore.resources.fields import json_to_struct, message_json, to_timestamp
from agentstore.resources.paging import Pages
from agentstore.v1 import audit_log_pb2, audit_log_service_pb2, audit_log_service_pb2_grpc

INSERT_AUDIT = """
INSERT INTO audit_logs (tenant_id, actor, actor_key_id, action, entity_type, entity_id, before, after, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9)
"""


def with_audit(
    ctes: str,
    *,
    action: str,
    entity_type: str,
    returning: str,
    first_param: int,
    before: str = "NULL",
    after: str = "w.audit_after",
    join: str = "",
) -> str:
    """One statement that writes and audits. `ctes` ends with a CTE named `written` (an INSERT,
    UPDATE or DELETE … RETURNING `id`, the columns in `returning`, and what `before` and `after`
    use: by default `audit_after`, the row's agentstore_<kind>_json of migrations 0006/0007, the
    one encoding of an entity's audit JSON). One audit row goes in per written row. $1 is the
    tenant; the actor, key id and request id (audit_args) are parameters first_param …
    first_param + 2. `join` may join, filter (WHERE) and order the written rows. Saves a round trip
    per write."""
    actor, key_id, request_id = first_param, first_param + 1, first_param + 2
    return f"""
WITH {ctes}, audited AS (
    INSERT INTO audit_logs (tenant_id, actor, actor_key_id, action, entity_type, entity_id, before, after, request_id)
    SELECT $1, ${actor}, ${key_id}, '{action}', '{entity_type}', w.id::text, {before}, {after}, ${request_id}
    FROM written AS w {join}
)
SELECT {returning} FROM written
"""


def audit_args(principal: Principal) -> tuple[str, uuid.UUID | None, str]:
    """The actor, key id and request id of this call's audit rows (for with_audit)."""
    ctx = current_request()
    return principal.actor, principal.key_id, ctx.request_id if ctx is not None else ""


async def write_audit(
    con: asyncpg.Connection,
    principal: Principal,
    tenant_id: uuid.UUID,
    action: str,
    entity_type: str,
    entity_id: uuid.UUID | str,
    before: Message | None,
    after: Message | None,
) -> None:
    """One audit row, in the caller's transaction, so it commits or vanishes with the change."""
    actor, key_id, request_id = audit_args(principal)
    await con.execute(
        INSERT_AUDIT,
        tenant_id,
        actor,
        key_id,
        action,
        entity_type,
        str(entity_id),
        message_json(before) if before is not None else None,
        message_json(after) if after is not None else None,
        request_id,
    )


INSERT_AUDITS = """
INSERT INTO audit_logs (tenant_id, actor, actor_key_id, action, entity_type, entity_id, before, after, request_id)
SELECT $1, $2, $3, u.action, u.entity_type, u.entity_id, u.before::jsonb, u.after::jsonb, $4
FROM unnest($5::text[], $6::text[], $7::text[], $8::text[], $9::text[]) WITH ORDINALITY
     AS u(action, entity_type, entity_id, before, after, n)
ORDER BY u.n
"""

# (action, entity_type, entity_id, before, after) of one audit row.
AuditEntry = tuple[str, str, "uuid.UUID | str", "Message | None", "Message | None"]


async def write_audits(
    con: asyncpg.Connection, principal: Principal, tenant_id: uuid.UUID, entries: Sequence[AuditEntry]
) -> None:
    """Several audit rows in one statement, in the caller's transaction and in the given order."""
    if not entries:
        return
    await con.execute(
        INSERT_AUDITS,
        tenant_id,
        *audit_args(principal),
        [e[0] for e in entries],
        [e[1] for e in entries],
        [str(e[2]) for e in entries],
        [message_json(e[3]) if e[3] is not None else None for e in entries],
        [message_json(e[4]) if e[4] is not None else None for e in entries],
    )


COLUMNS = """id, revision, actor, actor_key_id, action, entity_type, entity_id, before::text AS before,
       after::text AS after, request_id, create_time"""

# ListAuditLogsRequest.filter documents the same subset.
FILTER_FIELDS = filter_fields(
    entity_type=FieldKind.STRING,
    entity_id=FieldKind.STRING,
    actor=FieldKind.STRING,
    action=FieldKind.STRING,
    create_time=FieldKind.TIMESTAMP,
)
_REVISION = SortKey("revision", "revision", FieldKind.INTEGER)
LIST_SPEC = ListSpec(
    resource="audit_logs",
    select=f"SELECT {COLUMNS} FROM audit_logs WHERE tenant_id = $1",
    fields=FILTER_FIELDS,
    sort_keys=sort_keys(create_time=FieldKind.TIMESTAMP, revision=FieldKind.INTEGER),
    # Newest first; rows of one transaction share create_time, and revision orders them.
    default_order="create_time desc, revision desc",
    tie_breaker=_REVISION,
)


def audit_log_from_row(row: Record) -> audit_log_pb2.AuditLog:
    entry = audit_log_pb2.AuditLog(
        id=str(row["id"]),
        revision=row["revision"],
        actor=row["actor"],
        actor_key_id=str(row["actor_key_id"]) if row["actor_key_id"] is not None else "",
        action=row["action"],
        entity_type=row["entity_type"],
        entity_id=row["entity_id"],
        request_id=row["request_id"],
    )
    if row["before"] is not None:
        entry.before.SetInParent()
        json_to_struct(row["before"], entry.before)
    if row["after"] is not None:
        entry.after.SetInParent()
        json_to_struct(row["after"], entry.after)
    to_timestamp(row["create_time"], entry.create_time)
    return entry


class AuditLogService(audit_log_service_pb2_grpc.AuditLogServiceServicer):
    def __init__(self, pages: Pages) -> None:
        self._pages = pages

    async def ListAuditLogs(
        self, request: audit_log_service_pb2.ListAuditLogsRequest, context: Any
    ) -> audit_log_service_pb2.ListAuditLogsResponse:
        items, next_token = await self._pages.fetch(
            LIST_SPEC, current_principal().tenant_id, request, audit_log_from_row
        )
        return audit_log_service_pb2.ListAuditLogsResponse(audit_logs=items, next_page_token=next_token)


def register(add: Add, deps: Deps) -> None:
    add(audit_log_service_pb2_grpc.add_AuditLogServiceServicer_to_server, AuditLogService(deps.pages))


RESOURCE = Resource.of(audit_log_service_pb2, "AuditLogService", register)
