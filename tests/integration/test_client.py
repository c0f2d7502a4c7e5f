"""agentstore.client against a real server through real channels: metadata, errors, paging, retries.

The server under test runs on this event loop, so blocking (sync) client code runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentstore.client import (
    REQUEST_ID,
    SERVICE_CONFIG,
    acheck_health,
    aio_connect,
    aiter_items,
    aiter_pages,
    check_health,
    connect,
    error_details,
    iter_items,
    iter_pages,
)
from agentstore.server import App
from agentstore.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    audit_log_service_pb2,
    audit_log_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.integration.conftest import TenantKeys
from tests.integration.helpers import metadata_value, unique

PROTO_DIR = Path(__file__).resolve().parents[2] / "protos" / "agentstore" / "v1"


def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture
async def writer(app: App, tenant: TenantKeys) -> AsyncIterator[grpc.aio.Channel]:
    async with aio_connect(target(app), tenant.writer) as channel:
        yield channel


async def test_async_channel_adds_key_and_request_id(writer: grpc.aio.Channel) -> None:
    agents = agent_service_pb2_grpc.AgentServiceStub(writer)
    call = agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=unique("client"))))
    created = await call
    assert created.id
    # The server echoes the request id the interceptor made up.
    assert uuid.UUID(metadata_value(await call.trailing_metadata(), REQUEST_ID))
    # A request id the caller chose is kept.
    call = agents.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id), metadata=((REQUEST_ID, "mine-1"),))
    assert (await call).name == created.name
    assert metadata_value(await call.trailing_metadata(), REQUEST_ID) == "mine-1"


async def test_async_errors_decode_into_typed_values(app: App, writer: grpc.aio.Channel) -> None:
    agents = agent_service_pb2_grpc.AgentServiceStub(writer)
    name = unique("taken")
    await agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=name)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=name)))
    details = error_details(caught.value)
    assert (details.code, details.reason, details.domain) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "AGENT_NAME_TAKEN",
        "agentstore",
    )
    assert "agent.name" in details.fields
    assert details.request_id and uuid.UUID(details.request_id)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name="")))
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.field_violations and details.field_violations[0].field == "agent.name"
    assert details.field_violations[0].description

    async with aio_connect(target(app)) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agent_service_pb2_grpc.AgentServiceStub(anonymous).GetAgent(
                agent_service_pb2.GetAgentRequest(id=str(uuid.uuid4()))
            )
    details = error_details(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING")


async def test_async_paging_follows_every_token(writer: grpc.aio.Channel) -> None:
    agents = agent_service_pb2_grpc.AgentServiceStub(writer)
    skill = unique("skill")
    names = sorted(unique("paged") for _ in range(5))
    for name in names:
        await agents.CreateAgent(
            agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=name, capabilities=[skill]))
        )
    request = agent_service_pb2.ListAgentsRequest(filter=f'capabilities:"{skill}"', order_by="name", page_size=2)
    pages = [page async for page in aiter_pages(agents.ListAgents, request)]
    assert [len(p.agents) for p in pages] == [2, 2, 1]
    listed = [a.name async for a in aiter_items(agents.ListAgents, request, lambda page: page.agents)]
    assert listed == names
    assert request.page_token == ""  # the caller's request is left alone


async def test_async_paging_of_tasks_and_audit_logs(app: App, tenant: TenantKeys, writer: grpc.aio.Channel) -> None:
    tasks = task_service_pb2_grpc.TaskServiceStub(writer)
    title = unique("paged-task")
    created = [
        await tasks.CreateTask(task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=f"{title} {i}")))
        for i in range(3)
    ]
    listed = [
        t.id
        async for t in aiter_items(
            tasks.ListTasks, task_service_pb2.ListTasksRequest(page_size=1), lambda page: page.tasks
        )
    ]
    assert {t.id for t in created} <= set(listed)
    async with aio_connect(target(app), tenant.admin) as admin:
        audit = audit_log_service_pb2_grpc.AuditLogServiceStub(admin)
        request = audit_log_service_pb2.ListAuditLogsRequest(filter='entity_type = "task"', page_size=2)
        entities = [e.entity_id async for e in aiter_items(audit.ListAuditLogs, request, lambda p: p.audit_logs)]
    assert {t.id for t in created} <= set(entities)


def _sync_workflow(address: str, key: str) -> list[str]:
    """create, list in pages, update with etag and mask, a typed error: all through the blocking API."""
    seen: list[str] = []
    with connect(address, key) as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        skill = unique("sync")
        for i in range(3):
            agents.CreateAgent(
                agent_service_pb2.CreateAgentRequest(agent=agent_pb2.Agent(name=f"{skill}-{i}", capabilities=[skill]))
            )
        request = agent_service_pb2.ListAgentsRequest(filter=f'capabilities:"{skill}"', order_by="name", page_size=2)
        seen += [str(len(p.agents)) for p in iter_pages(agents.ListAgents, request)]
        listed = list(iter_items(agents.ListAgents, request, lambda page: page.agents))
        seen += [a.name for a in listed]
        first = listed[0]
        updated = agents.UpdateAgent(
            agent_service_pb2.UpdateAgentRequest(
                agent=agent_pb2.Agent(id=first.id, role="lead", etag=first.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            )
        )
        seen.append(updated.role)
        try:
            agents.UpdateAgent(
                agent_service_pb2.UpdateAgentRequest(
                    agent=agent_pb2.Agent(id=first.id, role="stale", etag=first.etag),
                    update_mask=field_mask_pb2.FieldMask(paths=["role"]),
                )
            )
        except grpc.RpcError as exc:
            details = error_details(exc)
            seen.append(f"{details.code.name} {details.reason}")
            seen.append("request id" if details.request_id and uuid.UUID(details.request_id) else "no request id")
    return seen


async def test_sync_channel_workflow(app: App, tenant: TenantKeys) -> None:
    seen = await asyncio.to_thread(_sync_workflow, target(app), tenant.writer)
    assert seen[:2] == ["2", "1"]
    assert [name.rsplit("-", 1)[1] for name in seen[2:5]] == ["0", "1", "2"]
    assert seen[5:] == ["lead", "ABORTED ETAG_MISMATCH", "request id"]


# --- the published service config: retry on UNAVAILABLE ------------------------------------


def test_service_config_names_every_service() -> None:
    config = json.loads(SERVICE_CONFIG)
    named = {n["service"] for mc in config["methodConfig"] for n in mc["name"]}
    declared = {
        f"agentstore.v1.{service}"
        for proto in PROTO_DIR.glob("*_service.proto")
        for service in re.findall(r"^service\s+(\w+)", proto.read_text(), flags=re.MULTILINE)
    }
    assert declared and declared | {"grpc.health.v1.Health"} == named
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]


class FlakyAgents(agent_service_pb2_grpc.AgentServiceServicer):
    """Answers UNAVAILABLE `failures` times, then the agent; a second RPC always fails with RetryInfo."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.request_ids: list[str] = []

    async def GetAgent(self, request: agent_service_pb2.GetAgentRequest, context: grpc.aio.ServicerContext) -> object:
        self.calls += 1
        self.request_ids.append(dict(context.invocation_metadata() or ()).get(REQUEST_ID, ""))
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return agent_pb2.Agent(id=request.id, name="flaky")

    async def DeleteAgent(
        self, request: agent_service_pb2.DeleteAgentRequest, context: grpc.aio.ServicerContext
    ) -> object:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=3))
        info = error_details_pb2.ErrorInfo(domain="agentstore", reason="POOL_EXHAUSTED")
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="busy")
        status.details.add().Pack(info)
        status.details.add().Pack(retry)
        await context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort_with_status returned")


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyAgents, str]]:
    servicer = FlakyAgents(failures=2)
    server = grpc.aio.server()
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_unavailable_is_retried_with_one_request_id(flaky: tuple[FlakyAgents, str]) -> None:
    servicer, address = flaky
    async with aio_connect(address, "key") as channel:
        agent = await agent_service_pb2_grpc.AgentServiceStub(channel).GetAgent(
            agent_service_pb2.GetAgentRequest(id="a"), timeout=30
        )
    assert agent.name == "flaky"
    assert servicer.calls == 3
    assert len(set(servicer.request_ids)) == 1 and servicer.request_ids[0]


async def test_without_the_service_config_unavailable_is_not_retried(flaky: tuple[FlakyAgents, str]) -> None:
    servicer, address = flaky
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agent_service_pb2_grpc.AgentServiceStub(channel).GetAgent(agent_service_pb2.GetAgentRequest(id="a"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 1
    assert error_details(caught.value).reason is None


async def test_retry_info_decodes_to_a_timedelta(flaky: tuple[FlakyAgents, str]) -> None:
    _servicer, address = flaky
    async with aio_connect(address, "key") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agent_service_pb2_grpc.AgentServiceStub(channel).DeleteAgent(
                agent_service_pb2.DeleteAgentRequest(id="a")
            )
    details = error_details(caught.value)
    assert (details.code, details.reason, details.retry_delay) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EXHAUSTED",
        timedelta(seconds=3),
    )


def test_error_details_refuses_errors_without_a_status() -> None:
    with pytest.raises(TypeError):
        error_details(grpc.RpcError())


async def test_health_checks_sync_and_async(app: App) -> None:
    async with aio_connect(target(app)) as channel:
        assert await acheck_health(channel) == "SERVING"
        assert await acheck_health(channel, "agentstore.v1.AgentService") == "SERVING"

    def blocking() -> str:
        with connect(target(app)) as channel:
            return check_health(channel, timeout=10)

    assert await asyncio.to_thread(blocking) == "SERVING"
