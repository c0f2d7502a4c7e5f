"""One resource spec and one write path for every resource that has an etag and a cache.

A `ResourceSpec` says what is particular to a resource: its table and columns, the row → proto
function, the not-found error, which fields an update may write, and the names of its two
PostgreSQL functions (the one-round-trip point read, migration 0005/0007, and the audit JSON,
migration 0006/0007). Everything else is written once, here:

* `loader`: the cache's point reads (`agentstore_read_<table>s`, one round trip).
* `update_paths` and `merge`: AIP-134 masks, validated before any transaction opens.
* `lock_for_update`: read-for-update with the etag check; the row comes with its audit JSON, so
  the update statement need not read it again.
* `delete`: the etag goes into the DELETE's WHERE clause, so a stale delete changes (and
  cascades) nothing; the audit row goes in the same statement.

After commit, `EntityCache.written(tenant, row)` encodes the row once: the response and both
cache tiers get the same bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import asyncpg
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from agentstore import metrics
from agentstore.cache.entity import Expiry, LoadMany
from agentstore.context import Principal
from agentstore.db import Database, Record
from agentstore.errors import ApiError, etag_mismatch
from agentstore.resources.audit import audit_args, with_audit
from agentstore.resources.masks import update_mask_paths

# Merge `patch` into a copy of `stored` along the update paths (the default: FieldMask.MergeMessage).
Merge = Callable[[Message, Message, Sequence[str]], Message]


@dataclass(frozen=True)
class ResourceSpec:
    entity: str  # "agent": the audit entity_type, the cache kind, the action prefix
    table: str
    # `{a}` is a table alias with its dot ("t."), or "".
    columns_of: str
    from_row: Callable[[Record], Message]
    not_found: Callable[[uuid.UUID | str], ApiError]
    read_function: str  # agentstore_read_<table>(tenant, ids): sets the tenant, then selects
    json_function: str  # agentstore_<entity>_json(row): the audit JSON, the only encoding of it
    updatable: tuple[str, ...] = ()
    output_only: tuple[str, ...] = ()
    immutable: tuple[str, ...] = ()
    key_prefixes: tuple[str, ...] = ()  # map-like sub-key paths, e.g. "state."
    # A predicate every statement adds (sessions: only live rows), starting with AND.
    live: str = ""
    merge: Merge | None = None
    # The Unix µs at which a row's (or cached bytes') copy stops being valid (sessions); None: no
    # end of their own.
    row_expires: Callable[[Record], int] | None = None
    expires: Expiry | None = None

    @cached_property
    def columns(self) -> str:
        return self.columns_of.format(a="")

    @cached_property
    def read_sql(self) -> str:
        return f"SELECT {self.columns} FROM {self.read_function}($1, $2::uuid[])"

    @cached_property
    def get_sql(self) -> str:
        return f"SELECT {self.columns} FROM {self.table} WHERE tenant_id = $1 AND id = $2 {self.live}"

    @cached_property
    def lock_sql(self) -> str:
        return f"""
SELECT {self.columns_of.format(a="t.")}, {self.json_function}(t) AS audit_before
FROM {self.table} AS t WHERE t.tenant_id = $1 AND t.id = $2 {self.live} FOR UPDATE
"""

    @cached_property
    def delete_sql(self) -> str:
        # $3: the version the etag names, or NULL (unconditional); $4-$6: audit_args.
        return with_audit(
            f"""written AS (
    DELETE FROM {self.table} AS t
    WHERE t.tenant_id = $1 AND t.id = $2 {self.live} AND ($3::int IS NULL OR t.version = $3)
    RETURNING {self.columns_of.format(a="t.")}, {self.json_function}(t) AS audit_before
)""",
            action=f"{self.entity}.delete",
            entity_type=self.entity,
            returning=self.columns,
            first_param=4,
            before="w.audit_before",
            after="NULL",
        )

    @cached_property
    def version_sql(self) -> str:
        return f"SELECT version FROM {self.table} WHERE tenant_id = $1 AND id = $2 {self.live}"

    def encode(self, row: Record) -> bytes:
        return self.from_row(row).SerializeToString()

    def cache_entry(self, row: Record) -> tuple[int, bytes, int | None]:
        """What the cache keeps of a written row: version, wire bytes, and when they stop being valid."""
        return row["version"], self.encode(row), self.row_expires(row) if self.row_expires is not None else None

    def update_paths(self, resource: Message, mask: field_mask_pb2.FieldMask | None) -> list[str]:
        return update_mask_paths(
            resource,
            mask,
            self.updatable,
            self.output_only,
            immutable=self.immutable,
            key_prefixes=self.key_prefixes,
        )

    def merged(self, stored: Message, patch: Message, paths: Sequence[str]) -> Message:
        """A copy of `stored` with the fields named in `paths` taken from `patch`."""
        if self.merge is not None:
            return self.merge(stored, patch, paths)
        merged = type(stored)()
        merged.CopyFrom(stored)
        if paths:
            # Replace (not append to) repeated fields; an unset message field in the patch clears it.
            field_mask_pb2.FieldMask(paths=list(paths)).MergeMessage(patch, merged, True, True)
        return merged


def parse_etag(etag: str) -> int | None:
    """The version an AIP-154 etag names: None for "" (unconditional), -1 for one this server
    never issued (it matches no version)."""
    if not etag:
        return None
    inner = etag[1:-1]
    if len(etag) < 14 and etag[0] == etag[-1] == '"' and inner.isdigit() and str(int(inner)) == inner:
        return int(inner)
    return -1


def loader(db: Database, spec: ResourceSpec) -> LoadMany:
    """The point reads of an entity cache: (version, wire bytes) of the tenant's rows among ids."""
    loads = metrics.DB_LOADS.labels(spec.entity)

    async def load_many(tenant: uuid.UUID, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[int, bytes]]:
        rows = await db.read(spec.read_sql, tenant, ids)
        loads.inc()
        # asyncpg's UUID type hashes in Python; the cache's keys are the standard library's.
        return {uuid.UUID(bytes=row["id"].bytes): (row["version"], spec.encode(row)) for row in rows}

    return load_many


async def lock_for_update(
    con: asyncpg.Connection, spec: ResourceSpec, tenant: uuid.UUID, entity_id: uuid.UUID, etag: str
) -> Record:
    """The row, locked for the rest of the transaction, with `audit_before`; NOT_FOUND, or
    ABORTED ETAG_MISMATCH when `etag` names another version."""
    row: Record | None = await con.fetchrow(spec.lock_sql, tenant, entity_id)
    if row is None:
        raise spec.not_found(entity_id)
    expected = parse_etag(etag)
    if expected is not None and expected != row["version"]:
        raise etag_mismatch(spec.entity)
    return row


async def delete(
    con: asyncpg.Connection, spec: ResourceSpec, principal: Principal, entity_id: uuid.UUID, etag: str
) -> Record:
    """Delete the row if `etag` matches, with its audit row, in one statement; the deleted row.

    A stale etag deletes (and cascades) nothing: ABORTED ETAG_MISMATCH; no row: NOT_FOUND.
    """
    tenant = principal.tenant_id
    row: Record | None = await con.fetchrow(
        spec.delete_sql, tenant, entity_id, parse_etag(etag), *audit_args(principal)
    )
    if row is not None:
        return row
    if await con.fetchval(spec.version_sql, tenant, entity_id) is None:
        raise spec.not_found(entity_id)
    raise etag_mismatch(spec.entity)
