from __future__ import annotations

from agentstore.v1 import agent_pb2, agent_service_pb2
from tests.integration.conftest import TenantKeys


async def test_create_and_get(agents_stub, tenant: TenantKeys) -> None:
    created = await agents_stub.CreateAgent(
        agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name="a1", capabilities=["python"])),
        metadata=tenant.md(),
    )
    got = await agents_stub.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=tenant.md("reader"))
    assert got == created
