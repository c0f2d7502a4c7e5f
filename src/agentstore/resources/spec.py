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
* `Create`, `Update` and `Delete`: one write each, prepared (parsed and validated) before the
  transaction opens; `apply(con, principal)` does it inside one (with its audit row, in the same
  statement as the change), and `run` commits one and writes the cache through.

After commit, `EntityCache.written(tenant, row)` encodes the row once: the response and both
cache tiers get the same bytes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import asyncpg
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from agentstore import metrics
from agentstore.cache.entity import EntityCache, Expiry, LoadMany
from agentstore.cache.l1 import L1Cache
from agentstore.context import Principal
from agentstore.db import Database, Record
from agentstore.deps import Deps
from agentstore.errors import ApiError, etag_mismatch, invalid_field
from agentstore.resources.audit import audit_args, with_audit
from agentstore.resources.fields import parse_id
from agentstore.resources.idempotency import parse_request_id, replay_create
from agentstore.resources.masks import update_mask_paths

# Merge `patch` into a copy of `stored` along the update paths (the default: FieldMask.MergeMessage).
Merge = Callable[[Message, Message, Sequence[str]], Message]
# Check the fields of a resource named by the paths (a create: `creatable`); the flag: a create.
Validate = Callable[[Any, Sequence[str], bool], None]
# The stored form of a (validated) resource's writable fields, in the order the statement takes them.
Values = Callable[[Any], list[Any]]


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
    validate: Validate
    # INSERT: the columns after tenant_id and id, their SQL values ($3 on), and the Python values.
    insert_columns: str
    insert_values: str
    create_values: Values
    # UPDATE: the SET clause ($3 on; version and update_time are added), and the Python values.
    update_set: str
    update_values: Values
    creatable: tuple[str, ...] = ()  # the fields a create writes (validated)
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
    def insert_sql(self) -> str:
        """The INSERT of one row ($1 tenant, $2 id, then insert_values) with its audit row."""
        return with_audit(
            f"""written AS (
    INSERT INTO {self.table} AS t (tenant_id, id, {self.insert_columns})
    VALUES ($1, $2, {self.insert_values})
    RETURNING {self.columns_of.format(a="t.")}, {self.json_function}(t) AS audit_after
)""",
            action=f"{self.entity}.create",
            entity_type=self.entity,
            returning=self.columns,
            first_param=_last_param(self.insert_values) + 1,
        )

    @cached_property
    def update_sql(self) -> str:
        """The UPDATE of one locked row ($1 tenant, $2 id, then update_set, then the audit
        `before` that lock_for_update read) with its audit row."""
        return self.audited_update(self.update_set, "update")

    def audited_update(self, assignments: str, action: str) -> str:
        """An UPDATE of one locked row ($1 tenant, $2 id; `assignments` use $3 on) that bumps the
        version and update_time, with an audit row whose `before` is the parameter after them."""
        before = _last_param(assignments) + 1
        return with_audit(
            f"""written AS (
    UPDATE {self.table} AS t
    SET {assignments}, version = t.version + 1, update_time = now()
    WHERE t.tenant_id = $1 AND t.id = $2 {self.live}
    RETURNING {self.columns_of.format(a="t.")}, {self.json_function}(t) AS audit_after
)""",
            action=f"{self.entity}.{action}",
            entity_type=self.entity,
            returning=self.columns,
            first_param=before + 1,
            before=f"${before}::jsonb",
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


def _last_param(sql: str) -> int:
    return max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=2)


def parse_etag(etag: str) -> int | None:
    """The version an AIP-154 etag names: None for "" (unconditional), -1 for one this server
    never issued (it matches no version)."""
    if not etag:
        return None
    inner = etag[1:-1]
    if len(etag) < 14 and etag[0] == etag[-1] == '"' and inner.isdigit() and str(int(inner)) == inner:
        return int(inner)
    return -1


def entity_cache(deps: Deps, spec: ResourceSpec) -> EntityCache:
    """The read-through cache of one resource (one per server: call it from a deps.shared factory)."""

    def build(l1: L1Cache) -> EntityCache:
        return EntityCache(
            spec.entity,
            l1,
            deps.l2,
            deps.bus,
            deps.circuit,
            deps.repairs,
            deps.trust,
            deps.settings.redis_key_prefix,
            loader(deps.db, spec),
            spec.cache_entry,
            expires=spec.expires,
            missing=spec.not_found,
        )

    return deps.cache_of(spec.entity, build)


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


# --- one write each, prepared before the transaction ------------------------------------------


@dataclass(frozen=True)
class Create:
    spec: ResourceSpec
    resource: Message
    request_id: uuid.UUID | None
    # How a resource an earlier create made can have gone (AIP-155 replay cannot return it).
    gone: str = "deleted"

    @staticmethod
    def of(spec: ResourceSpec, request: Any, gone: str = "deleted") -> Create:
        """From a Create<X>Request (its `<entity>` and `request_id`): parsed and validated."""
        if not request.HasField(spec.entity):
            raise invalid_field(spec.entity, "is required")
        resource = getattr(request, spec.entity)
        spec.validate(resource, spec.creatable, True)
        return Create(spec, resource, parse_request_id(request.request_id), gone)

    async def apply(self, con: asyncpg.Connection, principal: Principal) -> Record:
        """Insert the row with its audit row, or (AIP-155) return the row this request_id made."""
        spec, tenant, new_id = self.spec, principal.tenant_id, uuid.uuid4()
        earlier = await replay_create(con, tenant, self.request_id, spec.entity, new_id, spec.get_sql, how=self.gone)
        if earlier is not None:
            return earlier
        values = spec.create_values(self.resource)
        row: Record = await con.fetchrow(spec.insert_sql, tenant, new_id, *values, *audit_args(principal))
        return row


@dataclass(frozen=True)
class Update:
    spec: ResourceSpec
    entity_id: uuid.UUID
    patch: Message
    paths: list[str]

    @staticmethod
    def of(spec: ResourceSpec, request: Any) -> Update:
        """From an Update<X>Request (its `<entity>` and `update_mask`): parsed and validated."""
        if not request.HasField(spec.entity):
            raise invalid_field(spec.entity, "is required")
        patch = getattr(request, spec.entity)
        entity_id = parse_id(patch.id, f"{spec.entity}.id")
        paths = spec.update_paths(patch, request.update_mask if request.HasField("update_mask") else None)
        spec.validate(patch, paths, False)
        return Update(spec, entity_id, patch, paths)

    async def apply(self, con: asyncpg.Connection, principal: Principal) -> Record:
        """Lock the row, check the etag, merge by mask, update it with its audit row."""
        spec, tenant = self.spec, principal.tenant_id
        row = await lock_for_update(con, spec, tenant, self.entity_id, self.patch.etag)  # type: ignore[attr-defined]
        values = spec.update_values(spec.merged(spec.from_row(row), self.patch, self.paths))
        updated: Record = await con.fetchrow(
            spec.update_sql, tenant, self.entity_id, *values, row["audit_before"], *audit_args(principal)
        )
        return updated


async def run(db: Database, cache: EntityCache, principal: Principal, write: Create | Update) -> bytes:
    """One create or update in its own transaction; after commit, the cache written through.
    The written row's wire bytes (the response)."""
    tenant = principal.tenant_id
    row = await db.run(lambda con: write.apply(con, principal), tenant)
    return await cache.written(tenant, row)
