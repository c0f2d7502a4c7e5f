"""A real agentstore server on 127.0.0.1:0 and real gRPC channels to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from agentstore.config import Settings
from agentstore.server import App, start_server
from agentstore.v1 import (
    agent_service_pb2_grpc,
    tenant_pb2,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from tests.conftest import ScratchDatabase, Servers

PLATFORM_TOKEN = "test-platform-token"


def server_settings(prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "listen_address": "127.0.0.1:0",
        "platform_admin_token": PLATFORM_TOKEN,
        "page_token_secret": "test-page-token-secret",
        "redis_key_prefix": prefix,
        "health_probe_interval_seconds": 0.2,
        "shutdown_grace_seconds": 0,
        "access_log": True,
        # The machine is shared and noisy: a slow Redis reply must not open the outage circuit in
        # tests that count queries. The outage test kills Redis, which fails fast regardless.
        "redis_timeout_seconds": 1.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def app(servers: Servers, database: ScratchDatabase, redis_prefix: str) -> AsyncIterator[App]:
    app = await start_server(server_settings(redis_prefix), database.app_url, servers.redis_url)
    yield app
    await app.stop(0)


@pytest.fixture(scope="session")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


PLATFORM = bearer(PLATFORM_TOKEN)


@dataclass(frozen=True)
class TenantKeys:
    tenant: tenant_pb2.Tenant
    admin: str
    writer: str
    reader: str
    writer_key_id: str

    def md(self, role: str = "writer") -> tuple[tuple[str, str], ...]:
        return bearer(getattr(self, role))


@pytest.fixture(scope="session")
def tenants_stub(channel: grpc.aio.Channel) -> tenant_service_pb2_grpc.TenantServiceStub:
    return tenant_service_pb2_grpc.TenantServiceStub(channel)


@pytest.fixture(scope="session")
def agents_stub(channel: grpc.aio.Channel) -> agent_service_pb2_grpc.AgentServiceStub:
    return agent_service_pb2_grpc.AgentServiceStub(channel)


async def make_tenant(stub: tenant_service_pb2_grpc.TenantServiceStub, name: str) -> TenantKeys:
    tenant = await stub.CreateTenant(
        tenant_service_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(name=name)), metadata=PLATFORM
    )
    secrets: dict[str, str] = {}
    writer_id = ""
    for role_name, role in (
        ("admin", tenant_pb2.API_KEY_ROLE_ADMIN),
        ("writer", tenant_pb2.API_KEY_ROLE_WRITER),
        ("reader", tenant_pb2.API_KEY_ROLE_READER),
    ):
        created = await stub.CreateApiKey(
            tenant_service_pb2.CreateApiKeyRequest(tenant_id=tenant.id, api_key=tenant_pb2.ApiKey(role=role)),
            metadata=PLATFORM,
        )
        secrets[role_name] = created.secret
        if role_name == "writer":
            writer_id = created.api_key.id
    return TenantKeys(tenant, secrets["admin"], secrets["writer"], secrets["reader"], writer_id)


TenantFactory = Callable[[str], Awaitable[TenantKeys]]


@pytest.fixture(scope="session")
def new_tenant(tenants_stub: tenant_service_pb2_grpc.TenantServiceStub) -> TenantFactory:
    import uuid

    async def factory(label: str = "t") -> TenantKeys:
        return await make_tenant(tenants_stub, f"{label}-{uuid.uuid4().hex[:8]}")

    return factory


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantKeys:
    return await new_tenant("tenant")
