"""AIP-155 idempotent creates: a create retried with the same request_id returns the first result."""

from __future__ import annotations

import uuid

import asyncpg

from agentstore.db import Record
from agentstore.errors import invalid_argument
from agentstore.resources.fields import parse_id

CLAIM_REQUEST_ID = """
INSERT INTO create_requests (tenant_id, request_id, resource_type, resource_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, request_id) DO NOTHING
RETURNING resource_id
"""

GET_REQUEST_ID = """
SELECT resource_type, resource_id FROM create_requests WHERE tenant_id = $1 AND request_id = $2
"""


def parse_request_id(value: str) -> uuid.UUID | None:
    if not value:
        return None
    return parse_id(value, "request_id")


async def claim_request_id(
    con: asyncpg.Connection,
    tenant_id: uuid.UUID,
    request_id: uuid.UUID | None,
    resource_type: str,
    new_id: uuid.UUID,
) -> uuid.UUID | None:
    """AIP-155: None when this create goes ahead, else the id the first create with it made.

    A concurrent twin waits on the primary key until the first commits, then finds its row.
    """
    if request_id is None:
        return None
    claimed = await con.fetchval(CLAIM_REQUEST_ID, tenant_id, request_id, resource_type, new_id)
    if claimed is not None:
        return None
    row = await con.fetchrow(GET_REQUEST_ID, tenant_id, request_id)
    if row["resource_type"] != resource_type:
        raise invalid_argument(
            "REQUEST_ID_REUSED",
            f"request_id was already used to create a {row['resource_type']}",
            [("request_id", "already used for another kind of resource")],
        )
    existing: uuid.UUID = row["resource_id"]
    return existing


def created_resource_gone(kind: str, field: str = "request_id", how: str = "deleted") -> Exception:
    """A retried create whose first attempt's resource no longer exists (AIP-155 cannot replay it)."""
    return invalid_argument(
        "REQUEST_ID_REUSED",
        f"the {kind} this request_id created has since been {how}",
        [(field, f"its {kind} was {how}")],
    )


async def replay_create(
    con: asyncpg.Connection,
    tenant_id: uuid.UUID,
    request_id: uuid.UUID | None,
    kind: str,
    new_id: uuid.UUID,
    get_sql: str,
    *,
    how: str = "deleted",
) -> Record | None:
    """AIP-155 for a create: None when it goes ahead as `new_id`, else the row the first create
    with this request_id made (`get_sql` takes tenant and id). INVALID_ARGUMENT when that row
    is gone or the request_id created another kind of resource."""
    existing = await claim_request_id(con, tenant_id, request_id, kind, new_id)
    if existing is None:
        return None
    row: Record | None = await con.fetchrow(get_sql, tenant_id, existing)
    if row is None:
        raise created_resource_gone(kind, how=how)
    return row
