"""Tenants and API keys: SQL, row → proto, and the TenantService servicer (platform admin only)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc

from agentstore.auth import ROLE_DB_NAMES, ROLE_NAMES, Authenticator, new_api_key
from agentstore.context import Principal, Role, current_principal
from agentstore.db import ConstraintReason, Database, Record, register_constraint
from agentstore.deps import Add, Deps, Resource
from agentstore.errors import invalid_field, not_found
from agentstore.query import FieldKind
from agentstore.query.listing import ID_KEY, ListSpec, sort_keys
from agentstore.resources.audit import write_audit
from agentstore.resources.fields import check_text, from_timestamp, parse_id, to_timestamp
from agentstore.resources.paging import Pages
from agentstore.v1 import tenant_pb2, tenant_service_pb2, tenant_service_pb2_grpc

TENANT_COLUMNS = "id, name, create_time, update_time"
API_KEY_COLUMNS = "id, tenant_id, display_name, role, secret_prefix, expire_time, create_time, revoke_time"

INSERT_TENANT = f"INSERT INTO tenants (id, name) VALUES ($1, $2) RETURNING {TENANT_COLUMNS}"
GET_TENANT = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
GET_TENANT_BY_NAME = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"
INSERT_API_KEY = f"""
INSERT INTO api_keys (tenant_id, id, display_name, role, secret_hash, secret_prefix, expire_time)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {API_KEY_COLUMNS}
"""
REVOKE_API_KEY = f"""
UPDATE api_keys SET revoke_time = now(), update_time = now(), version = version + 1
WHERE tenant_id = $1 AND id = $2
RETURNING {API_KEY_COLUMNS}
"""
API_KEY_BY_ID = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND id = $2"

# Tenants are only visible across tenants under the platform scope; the `TRUE` keeps the select
# shape of every other List (a WHERE clause the plan appends to).
TENANTS_LIST = ListSpec(
    resource="tenants",
    select=f"SELECT {TENANT_COLUMNS} FROM tenants WHERE TRUE",
    fields={},
    sort_keys=sort_keys(name=FieldKind.STRING),
    default_order="name",
    tie_breaker=ID_KEY,
    base_params=0,
)
API_KEYS_LIST = ListSpec(
    resource="api_keys",
    select=f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1",
    fields={},
    sort_keys=sort_keys(create_time=FieldKind.TIMESTAMP),
    default_order="create_time desc",
    tie_breaker=ID_KEY,
)

_ROLE_TO_PROTO = {
    Role.READER: tenant_pb2.API_KEY_ROLE_READER,
    Role.WRITER: tenant_pb2.API_KEY_ROLE_WRITER,
    Role.ADMIN: tenant_pb2.API_KEY_ROLE_ADMIN,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}

register_constraint(
    "tenants_name_key",
    ConstraintReason(
        grpc.StatusCode.ALREADY_EXISTS, "TENANT_NAME_TAKEN", "a tenant with this name exists", "tenant.name"
    ),
)
register_constraint(
    "api_keys_tenant_id_fkey",
    ConstraintReason(grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND", "no such tenant"),
)


def tenant_from_row(row: Record) -> tenant_pb2.Tenant:
    tenant = tenant_pb2.Tenant(id=str(row["id"]), name=row["name"])
    to_timestamp(row["create_time"], tenant.create_time)
    to_timestamp(row["update_time"], tenant.update_time)
    return tenant


def api_key_from_row(row: Record) -> tenant_pb2.ApiKey:
    key = tenant_pb2.ApiKey(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        display_name=row["display_name"],
        role=_ROLE_TO_PROTO[ROLE_NAMES[row["role"]]],
        secret_prefix=row["secret_prefix"],
    )
    to_timestamp(row["expire_time"], key.expire_time)
    to_timestamp(row["create_time"], key.create_time)
    to_timestamp(row["revoke_time"], key.revoke_time)
    return key


async def create_tenant(db: Database, principal: Principal, name: str) -> tenant_pb2.Tenant:
    check_text(name, "tenant.name", max_len=128, required=True)
    tenant_id = uuid.uuid4()

    async def create(con: asyncpg.Connection) -> Record:
        row = await con.fetchrow(INSERT_TENANT, tenant_id, name)
        await write_audit(con, principal, tenant_id, "tenant.create", "tenant", tenant_id, None, tenant_from_row(row))
        return row

    # A new tenant is written inside its own tenant scope, which the row-level policy checks.
    return tenant_from_row(await db.run(create, tenant_id))


async def create_api_key(
    db: Database, principal: Principal, tenant_id: uuid.UUID, spec: tenant_pb2.ApiKey
) -> tenant_service_pb2.CreateApiKeyResponse:
    if spec.role not in _ROLE_FROM_PROTO:
        raise invalid_field("api_key.role", "must be READER, WRITER or ADMIN")
    check_text(spec.display_name, "api_key.display_name", max_len=128)
    expire_time: datetime | None = None
    if spec.HasField("expire_time"):
        expire_time = from_timestamp(spec.expire_time, "api_key.expire_time")
        if expire_time <= datetime.now(UTC):
            raise invalid_field("api_key.expire_time", "must be in the future")
    key = new_api_key(tenant_id)
    role = ROLE_DB_NAMES[_ROLE_FROM_PROTO[spec.role]]

    async def create(con: asyncpg.Connection) -> Record:
        row = await con.fetchrow(
            INSERT_API_KEY,
            tenant_id,
            key.key_id,
            spec.display_name,
            role,
            key.secret_hash,
            key.secret_prefix,
            expire_time,
        )
        await write_audit(
            con, principal, tenant_id, "api_key.create", "api_key", key.key_id, None, api_key_from_row(row)
        )
        return row

    row = await db.run(create, tenant_id)
    return tenant_service_pb2.CreateApiKeyResponse(api_key=api_key_from_row(row), secret=key.secret)


class TenantService(tenant_service_pb2_grpc.TenantServiceServicer):
    def __init__(self, db: Database, pages: Pages, authenticator: Authenticator) -> None:
        self._db = db
        self._pages = pages
        self._auth = authenticator

    async def CreateTenant(self, request: tenant_service_pb2.CreateTenantRequest, context: Any) -> tenant_pb2.Tenant:
        return await create_tenant(self._db, current_principal(), request.tenant.name)

    async def GetTenant(self, request: tenant_service_pb2.GetTenantRequest, context: Any) -> tenant_pb2.Tenant:
        tenant_id = parse_id(request.id)
        row = await self._db.run(lambda con: con.fetchrow(GET_TENANT, tenant_id), tenant_id, readonly=True)
        if row is None:
            raise not_found("TENANT_NOT_FOUND", f"no tenant {tenant_id}")
        return tenant_from_row(row)

    async def ListTenants(
        self, request: tenant_service_pb2.ListTenantsRequest, context: Any
    ) -> tenant_service_pb2.ListTenantsResponse:
        items, next_token = await self._pages.fetch(TENANTS_LIST, None, request, tenant_from_row, platform_scope=True)
        return tenant_service_pb2.ListTenantsResponse(tenants=items, next_page_token=next_token)

    async def CreateApiKey(
        self, request: tenant_service_pb2.CreateApiKeyRequest, context: Any
    ) -> tenant_service_pb2.CreateApiKeyResponse:
        tenant_id = parse_id(request.tenant_id, "tenant_id")
        return await create_api_key(self._db, current_principal(), tenant_id, request.api_key)

    async def ListApiKeys(
        self, request: tenant_service_pb2.ListApiKeysRequest, context: Any
    ) -> tenant_service_pb2.ListApiKeysResponse:
        tenant_id = parse_id(request.tenant_id, "tenant_id")
        items, next_token = await self._pages.fetch(API_KEYS_LIST, tenant_id, request, api_key_from_row)
        return tenant_service_pb2.ListApiKeysResponse(api_keys=items, next_page_token=next_token)

    async def RevokeApiKey(self, request: tenant_service_pb2.RevokeApiKeyRequest, context: Any) -> tenant_pb2.ApiKey:
        tenant_id = parse_id(request.tenant_id, "tenant_id")
        key_id = parse_id(request.id)
        principal = current_principal()

        async def revoke(con: asyncpg.Connection) -> Record:
            before = await con.fetchrow(API_KEY_BY_ID + " FOR UPDATE", tenant_id, key_id)
            if before is None:
                raise not_found("API_KEY_NOT_FOUND", f"no API key {key_id} in tenant {tenant_id}")
            if before["revoke_time"] is not None:
                return before
            row = await con.fetchrow(REVOKE_API_KEY, tenant_id, key_id)
            await write_audit(
                con,
                principal,
                tenant_id,
                "api_key.revoke",
                "api_key",
                key_id,
                api_key_from_row(before),
                api_key_from_row(row),
            )
            return row

        row = await self._db.run(revoke, tenant_id)
        await self._auth.revoked(key_id)
        return api_key_from_row(row)


def register(add: Add, deps: Deps) -> None:
    add(
        tenant_service_pb2_grpc.add_TenantServiceServicer_to_server,
        TenantService(deps.db, deps.pages, deps.authenticator),
    )


RESOURCE = Resource.of(tenant_service_pb2, "TenantService", register, platform=True)
