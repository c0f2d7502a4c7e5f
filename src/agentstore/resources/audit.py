"""Audit logs: row → proto and the read-only AuditLogService servicer.

Rows are written by every mutation through `common.write_audit`; nothing here writes.
"""

from __future__ import annotations

from typing import Any

from agentstore.context import current_principal
from agentstore.db import Database, Record
from agentstore.query import FieldKind, FieldSpec, PageTokenCodec, SortKey
from agentstore.query.listing import ListSpec
from agentstore.resources.common import fetch_page, json_to_struct, to_timestamp
from agentstore.v1 import audit_log_pb2, audit_log_service_pb2, audit_log_service_pb2_grpc

COLUMNS = """id, revision, actor, actor_key_id, action, entity_type, entity_id, before::text AS before,
       after::text AS after, request_id, create_time"""

# ListAuditLogsRequest.filter documents the same subset.
FILTER_FIELDS = {
    "entity_type": FieldSpec("entity_type", FieldKind.STRING),
    "entity_id": FieldSpec("entity_id", FieldKind.STRING),
    "actor": FieldSpec("actor", FieldKind.STRING),
    "action": FieldSpec("action", FieldKind.STRING),
    "create_time": FieldSpec("create_time", FieldKind.TIMESTAMP),
}
LIST_SPEC = ListSpec(
    resource="audit_logs",
    select=f"SELECT {COLUMNS} FROM audit_logs WHERE tenant_id = $1",
    fields=FILTER_FIELDS,
    sort_keys={
        "create_time": SortKey("create_time", "create_time", FieldKind.TIMESTAMP),
        "revision": SortKey("revision", "revision", FieldKind.INTEGER),
    },
    # Newest first; rows of one transaction share create_time, and revision orders them.
    default_order="create_time desc, revision desc",
    tie_breaker=SortKey("revision", "revision", FieldKind.INTEGER),
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
    def __init__(self, db: Database, page_tokens: PageTokenCodec) -> None:
        self._db = db
        self._page_tokens = page_tokens

    async def ListAuditLogs(
        self, request: audit_log_service_pb2.ListAuditLogsRequest, context: Any
    ) -> audit_log_service_pb2.ListAuditLogsResponse:
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
        return audit_log_service_pb2.ListAuditLogsResponse(
            audit_logs=[audit_log_from_row(row) for row in page], next_page_token=next_token
        )
