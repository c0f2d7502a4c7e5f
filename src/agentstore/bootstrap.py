"""Creating a tenant and its first admin key outside gRPC: `agentstore tenants create`, `agentstore dev`."""

from __future__ import annotations

import uuid

from agentstore.auth import PLATFORM_PRINCIPAL
from agentstore.config import Settings
from agentstore.db import Database
from agentstore.resources.tenants import GET_TENANT_BY_NAME, create_api_key, create_tenant, tenant_from_row
from agentstore.v1 import tenant_pb2


async def find_tenant(db: Database, name: str) -> tenant_pb2.Tenant | None:
    row = await db.run(lambda con: con.fetchrow(GET_TENANT_BY_NAME, name), None, readonly=True, platform_scope=True)
    return tenant_from_row(row) if row is not None else None


async def new_admin_key(db: Database, tenant: tenant_pb2.Tenant, label: str) -> str:
    response = await create_api_key(
        db,
        PLATFORM_PRINCIPAL,
        uuid.UUID(tenant.id),
        tenant_pb2.ApiKey(role=tenant_pb2.API_KEY_ROLE_ADMIN, display_name=label),
    )
    return response.secret


async def bootstrap_tenant(settings: Settings, database_url: str, name: str) -> tuple[tenant_pb2.Tenant, str]:
    db = Database(settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1}), database_url)
    await db.open()
    try:
        tenant = await create_tenant(db, PLATFORM_PRINCIPAL, name)
        return tenant, await new_admin_key(db, tenant, "bootstrap")
    finally:
        await db.close()
