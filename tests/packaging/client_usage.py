"""A program using agentstore-client, run with the floor versions and checked with mypy --strict.

Run in the floor venv (tests/packaging/test_floors.py) against a server started there:
    python client_usage.py HOST:PORT PLATFORM_TOKEN
It prints one JSON object with what it saw. Sync and asyncio, both.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import grpc

from agentstore.client import aio_connect, aiter_items, connect, error_details, iter_items
from agentstore.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    tenant_pb2,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)


def make_key(address: str, platform_token: str) -> str:
    with connect(address, platform_token) as channel:
        tenants = tenant_service_pb2_grpc.TenantServiceStub(channel)
        tenant = tenants.CreateTenant(
            tenant_service_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(name=f"floors-{uuid.uuid4().hex[:8]}"))
        )
        created = tenants.CreateApiKey(
            tenant_service_pb2.CreateApiKeyRequest(
                tenant_id=tenant.id, api_key=tenant_pb2.ApiKey(role=tenant_pb2.API_KEY_ROLE_WRITER)
            )
        )
        return created.secret


def sync_part(address: str, key: str) -> dict[str, object]:
    with connect(address, key) as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        for name in ("a", "b", "c"):
            agents.CreateAgent(
                agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=name, capabilities=["sync"]))
            )
        request = agent_service_pb2.ListAgentsRequest(filter='capabilities:"sync"', order_by="name", page_size=2)
        names = [agent.name for agent in iter_items(agents.ListAgents, request, lambda page: page.agents)]
        try:
            agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name="a")))
            reason: str | None = "no error"
        except grpc.RpcError as exc:
            reason = error_details(exc).reason
    return {"sync_names": names, "sync_reason": reason}


async def async_part(address: str, key: str) -> dict[str, object]:
    async with aio_connect(address, key) as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        request = agent_service_pb2.ListAgentsRequest(order_by="name", page_size=1)
        names = [agent.name async for agent in aiter_items(agents.ListAgents, request, lambda page: page.agents)]
        try:
            await agents.GetAgent(agent_service_pb2.GetAgentRequest(id="not-a-uuid"))
            fields: tuple[str, ...] = ()
        except grpc.aio.AioRpcError as exc:
            details = error_details(exc)
            fields = (details.code.name, details.reason or "", *details.fields)
    return {"async_names": names, "async_error": list(fields)}


def main() -> None:
    address, platform_token = sys.argv[1], sys.argv[2]
    key = make_key(address, platform_token)
    seen = sync_part(address, key)
    seen.update(asyncio.run(async_part(address, key)))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
