"""AuditLogService end to end, and the audit log's append-only grant."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format

from agentstore.v1 import agent_service_pb2, audit_log_pb2, audit_log_service_pb2, audit_log_service_pb2_grpc
from tests.conftest import ScratchDatabase
from tests.integration.conftest import TenantFactory, TenantKeys
from tests.integration.helpers import Metadata, create_agent, expect_error

S = grpc.StatusCode
# Creating a test tenant writes audit rows too (its API keys): most checks look at agents only.
AGENTS = 'entity_type = "agent"'


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> audit_log_service_pb2_grpc.AuditLogServiceStub:
    return audit_log_service_pb2_grpc.AuditLogServiceStub(channel)


async def list_logs(
    stub: audit_log_service_pb2_grpc.AuditLogServiceStub,
    md: Metadata,
    filter: str = "",
    order_by: str = "",
    page_size: int = 0,
) -> list[audit_log_pb2.AuditLog]:
    logs: list[audit_log_pb2.AuditLog] = []
    token = ""
    while True:
        response = await stub.ListAuditLogs(
            audit_log_service_pb2.ListAuditLogsRequest(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token
            ),
            metadata=md,
        )
        logs += response.audit_logs
        token = response.next_page_token
        if not token:
            return logs


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def create_update_delete(agents_stub, tenant: TenantKeys) -> str:
    agent = await create_agent(agents_stub, tenant.md(), role="planner")
    agent.role = "executor"
    await agents_stub.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(agent=agent, update_mask=field_mask_pb2.FieldMask(paths=["role"])),
        metadata=tenant.md(),
    )
    await agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=agent.id), metadata=tenant.md())
    return agent.id


async def test_agent_lifecycle_newest_first(stub, agents_stub, tenant: TenantKeys) -> None:
    agent_id = await create_update_delete(agents_stub, tenant)
    logs = await list_logs(stub, tenant.md("reader"), AGENTS)
    assert [log.action for log in logs] == ["agent.delete", "agent.update", "agent.create"]
    assert {log.entity_id for log in logs} == {agent_id}
    assert {log.entity_type for log in logs} == {"agent"}
    assert {log.actor_key_id for log in logs} == {tenant.writer_key_id}
    assert [log.revision for log in logs] == sorted((log.revision for log in logs), reverse=True)
    deleted, updated, created = logs
    assert not created.HasField("before") and created.after["role"] == "planner"
    assert updated.before["role"] == "planner" and updated.after["role"] == "executor"
    assert deleted.before["role"] == "executor" and not deleted.HasField("after")
    assert json_format.MessageToDict(created.after)["id"] == agent_id
    assert all(log.id and log.request_id and log.HasField("create_time") for log in logs)


async def test_filters(stub, agents_stub, tenant: TenantKeys) -> None:
    first = await create_update_delete(agents_stub, tenant)
    second = await create_agent(agents_stub, tenant.md())
    md = tenant.md("reader")

    by_entity = await list_logs(stub, md, f'entity_id = "{first}"')
    assert [log.action for log in by_entity] == ["agent.delete", "agent.update", "agent.create"]
    assert [log.entity_id for log in await list_logs(stub, md, f'{AGENTS} AND entity_id != "{first}"')] == [second.id]
    assert len(await list_logs(stub, md, 'entity_type = "agent"')) == 4
    assert await list_logs(stub, md, 'entity_type = "task"') == []
    assert [log.entity_id for log in await list_logs(stub, md, 'action = "agent.create"')] == [second.id, first]
    assert len(await list_logs(stub, md, f'{AGENTS} AND action != "agent.create"')) == 2
    assert len(await list_logs(stub, md, 'actor = "api_key"')) == 4
    # Creating the tenant and its three API keys was the platform admin's doing.
    platform = await list_logs(stub, md, 'actor = "platform_admin"')
    assert sorted(log.action for log in platform) == ["api_key.create"] * 3 + ["tenant.create"]
    both = await list_logs(stub, md, f'entity_id = "{first}" AND (action = "agent.update" OR action = "agent.delete")')
    assert [log.action for log in both] == ["agent.delete", "agent.update"]

    oldest_first = await list_logs(stub, md, AGENTS, order_by="create_time, revision")
    assert [log.action for log in oldest_first] == ["agent.create", "agent.update", "agent.delete", "agent.create"]

    await expect_error(list_logs(stub, md, 'tenant_id = "x"'), S.INVALID_ARGUMENT, "INVALID_FILTER", field="filter")
    await expect_error(list_logs(stub, md, order_by="actor"), S.INVALID_ARGUMENT, "INVALID_ORDER_BY")


async def test_time_range(stub, agents_stub, tenant: TenantKeys) -> None:
    await create_agent(agents_stub, tenant.md())
    logs = await list_logs(stub, tenant.md("reader"), AGENTS)
    moment = logs[0].create_time.ToDatetime(tzinfo=UTC)
    md = tenant.md("reader")
    assert len(await list_logs(stub, md, f'create_time >= "{rfc3339(moment)}"')) == 1
    assert len(await list_logs(stub, md, f'create_time = "{rfc3339(moment)}"')) == 1
    assert await list_logs(stub, md, f'create_time > "{rfc3339(moment)}"') == []
    assert await list_logs(stub, md, f'{AGENTS} AND create_time < "{rfc3339(moment)}"') == []
    hour = timedelta(hours=1)
    window = f'create_time > "{rfc3339(moment - hour)}" AND create_time < "{rfc3339(moment + hour)}"'
    assert len(await list_logs(stub, md, f"{AGENTS} AND {window}")) == 1
    assert len(await list_logs(stub, md, f"NOT ({window})")) == 0


async def test_paging_and_tampered_token(stub, agents_stub, tenant: TenantKeys) -> None:
    made = [await create_agent(agents_stub, tenant.md()) for _ in range(7)]
    md = tenant.md("reader")
    paged = await list_logs(stub, md, AGENTS, page_size=3)
    assert [log.entity_id for log in paged] == [a.id for a in reversed(made)]
    assert paged == await list_logs(stub, md, AGENTS)
    assert len(await list_logs(stub, md, page_size=2)) == len(made) + 4  # with the tenant's own rows

    first = await stub.ListAuditLogs(audit_log_service_pb2.ListAuditLogsRequest(page_size=3), metadata=md)
    token = first.next_page_token
    assert token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (tampered, "garbage", token[:10]):
        await expect_error(
            stub.ListAuditLogs(audit_log_service_pb2.ListAuditLogsRequest(page_size=3, page_token=bad), metadata=md),
            S.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )
    # A token only continues the filter it was issued for.
    await expect_error(
        stub.ListAuditLogs(
            audit_log_service_pb2.ListAuditLogsRequest(page_size=3, page_token=token, filter='actor = "api_key"'),
            metadata=md,
        ),
        S.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await expect_error(
        stub.ListAuditLogs(audit_log_service_pb2.ListAuditLogsRequest(page_size=-1), metadata=md),
        S.INVALID_ARGUMENT,
        "INVALID_PAGE_SIZE",
    )


async def test_other_tenant_sees_nothing(stub, agents_stub, tenant: TenantKeys, new_tenant: TenantFactory) -> None:
    agent_id = await create_update_delete(agents_stub, tenant)
    other = await new_tenant("other")
    assert {log.entity_type for log in await list_logs(stub, other.md("reader"))} == {"api_key", "tenant"}
    assert await list_logs(stub, other.md("reader"), AGENTS) == []
    assert await list_logs(stub, other.md(), f'entity_id = "{agent_id}"') == []


async def test_app_role_cannot_update_or_delete_audit_logs(
    agents_stub, database: ScratchDatabase, tenant: TenantKeys
) -> None:
    await create_agent(agents_stub, tenant.md())
    con = await asyncpg.connect(database.app_url)
    try:
        for statement in (
            "UPDATE audit_logs SET action = 'forged' WHERE tenant_id = $1",
            "DELETE FROM audit_logs WHERE tenant_id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with con.transaction():
                    await con.execute("SELECT set_config('agentstore.tenant_id', $1, true)", tenant.tenant.id)
                    await con.execute(statement, uuid.UUID(tenant.tenant.id))
        async with con.transaction():
            await con.execute("SELECT set_config('agentstore.tenant_id', $1, true)", tenant.tenant.id)
            assert await con.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'forged'") == 0
            assert await con.fetchval("SELECT count(*) FROM audit_logs WHERE entity_type = 'agent'") == 1
    finally:
        await con.close()
