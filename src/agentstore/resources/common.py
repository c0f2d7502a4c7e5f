"""What every resource module shares: ids, etags, timestamps, JSON, audit rows, idempotent creates."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import asyncpg
from google.protobuf import field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from agentstore.context import Principal, current_request
from agentstore.db import Database, Record
from agentstore.errors import invalid_argument, invalid_field
from agentstore.query import PageTokenCodec
from agentstore.query.listing import ListSpec, plan_list

MAX_BATCH_IDS = 1000
MAX_STRUCT_BYTES = 64 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def repeated_message_bytes(field_number: int, payloads: Iterable[bytes]) -> bytes:
    """Wire bytes of a message whose only field is `repeated <Message> = field_number`, built from
    already-serialized elements (cached bytes are answered without decoding and re-encoding)."""
    tag = _varint((field_number << 3) | 2)
    return b"".join(tag + _varint(len(p)) + p for p in payloads)


def _bad_mask(message: str) -> Exception:
    return invalid_argument("INVALID_UPDATE_MASK", message, [("update_mask", message)])


def update_mask_paths(
    resource: Message,
    mask: field_mask_pb2.FieldMask | None,
    updatable: Sequence[str],
    output_only: Sequence[str],
    *,
    immutable: Sequence[str] = (),
    key_prefixes: Sequence[str] = (),
) -> list[str]:
    """AIP-134 update paths: the mask's (checked), `*` alone for every updatable field, or, with
    no mask, every updatable field set in `resource`. `key_prefixes` (e.g. "state.") admit
    sub-key paths of a map-like field."""
    if mask is None or not mask.paths:
        return [f.name for f, _ in resource.ListFields() if f.name in updatable]
    if "*" in mask.paths:
        if len(mask.paths) > 1:
            raise _bad_mask("`*` must be the only path")
        return list(updatable)
    paths: list[str] = []
    for path in mask.paths:
        if path in output_only:
            raise _bad_mask(f"{path} is output only")
        if path in immutable:
            raise _bad_mask(f"{path} cannot be changed")
        prefix = next((p for p in key_prefixes if path.startswith(p)), None)
        if prefix is not None:
            if path == prefix:
                raise _bad_mask(f"{prefix} needs a key after the dot")
        elif path not in updatable:
            raise _bad_mask(f"unknown field {path!r}")
        if path not in paths:
            paths.append(path)
    return paths


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    """A client-supplied UUID, or INVALID_ARGUMENT (INVALID_ID) naming the field."""
    try:
        if len(value) > 64:
            raise ValueError
        return uuid.UUID(value)
    except ValueError:
        raise invalid_argument("INVALID_ID", f"{field} must be a UUID", [(field, "must be a UUID")]) from None


def etag_of(version: int) -> str:
    return f'"{version}"'


def etag_matches(etag: str, version: int) -> bool:
    """An empty etag means unconditional; anything else must equal the stored version's."""
    return not etag or etag == etag_of(version)


def to_timestamp(value: datetime | None, target: timestamp_pb2.Timestamp) -> None:
    if value is not None:
        target.FromDatetime(value)


def from_timestamp(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid_field(field, "timestamp out of range") from None


def check_text(value: str, field: str, *, max_len: int, required: bool = False) -> None:
    if required and not value:
        raise invalid_field(field, "is required")
    if len(value) > max_len:
        raise invalid_field(field, f"must be at most {max_len} characters")
    if "\x00" in value:
        raise invalid_field(field, "must not contain NUL characters")


def struct_to_json(value: struct_pb2.Struct, field: str) -> str:
    """Struct → JSON text for a jsonb column, rejecting what PostgreSQL would refuse."""
    try:
        text = json.dumps(json_format.MessageToDict(value), allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise invalid_field(field, "numbers must be finite") from None
    if len(text) > MAX_STRUCT_BYTES:
        raise invalid_field(field, f"must be at most {MAX_STRUCT_BYTES} bytes as JSON")
    if "\\u0000" in text:
        raise invalid_field(field, "must not contain NUL characters")
    return text


def json_to_struct(text: str | None, target: struct_pb2.Struct) -> None:
    if text:
        target.update(json.loads(text))


def message_json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), separators=(",", ":"))


async def fetch_page(
    db: Database,
    codec: PageTokenCodec,
    spec: ListSpec,
    tenant_id: uuid.UUID | None,
    *,
    page_size: int,
    page_token: str,
    filter: str = "",
    order_by: str = "",
    platform_scope: bool = False,
    base: Sequence[object] | None = None,
) -> tuple[Sequence[Record], str]:
    """One page of a List RPC and the next page token.

    `base` fills the spec's first `base_params` parameters; by default $1 is the tenant.
    """
    plan = plan_list(spec, codec, page_size=page_size, page_token=page_token, filter=filter, order_by=order_by)
    if base is None:
        base = (tenant_id,) if spec.base_params else ()
    rows = await db.run(
        lambda con: con.fetch(plan.sql, *base, *plan.params), tenant_id, readonly=True, platform_scope=platform_scope
    )
    return plan.page(rows, codec)


LIST_TENANT_IDS = "SELECT id FROM tenants ORDER BY id"


async def all_tenant_ids(db: Database) -> list[uuid.UUID]:
    """Every tenant, read under the platform scope: for jobs that visit each tenant in turn."""
    rows = await db.run(lambda con: con.fetch(LIST_TENANT_IDS), None, readonly=True, platform_scope=True)
    return [row["id"] for row in rows]


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
    join: str = "",
) -> str:
    """One statement that writes and audits: `ctes` ends with a CTE named `written`, an INSERT or
    UPDATE … RETURNING `id`, the columns in `returning` and `audit_after` (the row's
    agentstore_<kind>_json, migration 0006); an audit row goes in per written row. $1 is the tenant;
    the actor, key id and request id (audit_args) are parameters first_param … first_param + 2.
    `before` is the SQL of the audit's `before` JSON; `join` may join and order the written rows.
    Saves the audit round trip and the Python JSON encoding of write_audit."""
    actor, key_id, request_id = first_param, first_param + 1, first_param + 2
    return f"""
WITH {ctes}, audited AS (
    INSERT INTO audit_logs (tenant_id, actor, actor_key_id, action, entity_type, entity_id, before, after, request_id)
    SELECT $1, ${actor}, ${key_id}, '{action}', '{entity_type}', w.id::text, {before}, w.audit_after, ${request_id}
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
