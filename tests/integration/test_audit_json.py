"""agentstore_agent_json, agentstore_task_json (migration 0006) and agentstore_session_json (0007)
build the audit JSON inside PostgreSQL, so that every write and its audit row go in one statement;
they are the only encoding of those entities' audit JSON. Each must equal the protobuf JSON (proto
field names, defaults omitted) of the resource the API answers, for rows in every state."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from agentstore.resources.agents import COLUMNS_OF as AGENT_COLUMNS_OF
from agentstore.resources.agents import agent_from_row
from agentstore.resources.tasks.model import task_from_row
from agentstore.resources.tasks.sql import COLUMNS_OF
from agentstore.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.conftest import ScratchDatabase
from tests.integration.helpers import create_agent, unique

ROW_AND_JSON = f"SELECT {COLUMNS_OF.format(a='t.')}, agentstore_task_json(t)::text AS j FROM tasks t"


@pytest.fixture(scope="module")
def tasks_stub(channel) -> task_service_pb2_grpc.TaskServiceStub:
    return task_service_pb2_grpc.TaskServiceStub(channel)


def api_json(message: Message) -> dict[str, object]:
    """The protobuf JSON of what the API answered (the test's own encoding, not the server's)."""
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))


def python_json(row: asyncpg.Record) -> dict[str, object]:
    return api_json(task_from_row(row))


async def rows_of(database: ScratchDatabase, tenant_id: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(database.owner_url)
    try:
        return await con.fetch(f"{ROW_AND_JSON} WHERE t.tenant_id = $1 ORDER BY t.create_time", uuid.UUID(tenant_id))
    finally:
        await con.close()


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),  # no fraction
        datetime(2026, 1, 2, 3, 4, 5, 120_000, tzinfo=UTC),  # milliseconds: 3 digits
        datetime(2026, 1, 2, 3, 4, 5, 1_000, tzinfo=UTC),  # 3 digits with leading zeros
        datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC),  # microseconds: 6 digits
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
async def test_proto_time_matches_protobuf_json(database: ScratchDatabase, moment: datetime) -> None:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    con = await asyncpg.connect(database.owner_url)
    try:
        # A session time zone far from UTC: the function must not depend on it.
        await con.execute("SET TIME ZONE 'Asia/Kathmandu'")
        assert await con.fetchval("SELECT agentstore_proto_time($1)", moment) == ts.ToJsonString()
        assert await con.fetchval("SELECT agentstore_proto_time(NULL)") is None
    finally:
        await con.close()


async def test_task_json_matches_the_message_encoding_in_every_state(
    tasks_stub, agents_stub: agent_service_pb2_grpc.AgentServiceStub, tenant, database: ScratchDatabase
) -> None:
    md = tenant.md()
    agent = await create_agent(agents_stub, md, unique("worker"), capabilities=["gpu"])

    def make(title: str, **fields: object) -> task_service_pb2.CreateTaskRequest:
        payload = fields.pop("payload", None)
        task = task_pb2.Task(title=title, **fields)  # type: ignore[arg-type]
        if payload is not None:
            task.payload.update(payload)  # type: ignore[arg-type]
        return task_service_pb2.CreateTaskRequest(task=task)

    lease = duration_pb2.Duration(seconds=30)

    async def claim() -> task_service_pb2.ClaimTaskResponse:
        request = task_service_pb2.ClaimTaskRequest(agent_id=agent.id, lease_duration=lease)
        return await tasks_stub.ClaimTask(request, metadata=md)

    # Claims go by priority: "bare" first, then "rich" (it needs "gpu"), then "to fail".
    await tasks_stub.CreateTask(make("bare"), metadata=md)  # empty payload and description, priority 0
    await tasks_stub.CreateTask(
        make(
            'rich ü "quoted" \\ task',
            description="line one\nline two",
            priority=-7,
            required_capabilities=["gpu"],
            max_attempts=9,
            payload={"n": None, "i": 3, "f": 2.5, "big": 2**53, "s": "x", "nested": {"list": [1, "a", None, {}]}},
        ),
        metadata=md,
    )
    await tasks_stub.CreateTask(make("to fail", priority=-100), metadata=md)
    to_cancel = await tasks_stub.CreateTask(make("to cancel", priority=-200), metadata=md)
    first = await claim()
    result = struct_pb2.Struct()
    result.update({"ok": True, "z": None})
    await tasks_stub.CompleteTask(
        task_service_pb2.CompleteTaskRequest(task_id=first.task.id, lease_token=first.lease_token, result=result),
        metadata=md,
    )
    await claim()  # "rich" stays RUNNING, with a lease
    third = await claim()
    await tasks_stub.FailTask(
        task_service_pb2.FailTaskRequest(task_id=third.task.id, lease_token=third.lease_token, error="boom: ü"),
        metadata=md,
    )
    await tasks_stub.UpdateTask(
        task_service_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=to_cancel.id, status=task_pb2.TASK_STATUS_CANCELLED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=md,
    )

    rows = await rows_of(database, tenant.tenant.id)
    statuses = {task_from_row(r).status for r in rows}
    assert statuses == {
        task_pb2.TASK_STATUS_RUNNING,
        task_pb2.TASK_STATUS_SUCCEEDED,
        task_pb2.TASK_STATUS_FAILED,
        task_pb2.TASK_STATUS_CANCELLED,
    }, statuses
    for row in rows:
        assert json.loads(row["j"]) == python_json(row), row["title"]

    # Timestamps with no fraction and with whole milliseconds take the short protobuf forms.
    con = await asyncpg.connect(database.owner_url)
    try:
        await con.execute(
            "UPDATE tasks SET create_time = '2026-03-04T05:06:07Z', update_time = '2026-03-04T05:06:07.250Z' "
            "WHERE tenant_id = $1",
            uuid.UUID(tenant.tenant.id),
        )
    finally:
        await con.close()
    for row in await rows_of(database, tenant.tenant.id):
        expected = python_json(row)
        assert expected["create_time"] == "2026-03-04T05:06:07Z" and expected["update_time"].endswith(".250Z")
        assert json.loads(row["j"]) == expected, row["title"]


async def test_batch_create_audit_rows_equal_the_returned_tasks(tasks_stub, tenant, database: ScratchDatabase) -> None:
    requests = []
    for i in range(50):
        task = task_pb2.Task(
            title=f"audited {i}", description="d" * (i % 4), priority=i % 3, required_capabilities=["a"] * (i % 2)
        )
        if i % 5:
            task.payload.update({"i": i, "tag": None if i % 2 else "even"})
        requests.append(task_service_pb2.CreateTaskRequest(task=task))
    response = await tasks_stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(requests=requests), metadata=tenant.md()
    )
    con = await asyncpg.connect(database.owner_url)
    try:
        audits = await con.fetch(
            "SELECT entity_id, after::text AS after, before, actor, actor_key_id, request_id FROM audit_logs"
            " WHERE tenant_id = $1 AND action = 'task.create' ORDER BY revision",
            uuid.UUID(tenant.tenant.id),
        )
    finally:
        await con.close()
    # One row per task, in the order of the request, each equal to the task the caller got back.
    assert [a["entity_id"] for a in audits] == [t.id for t in response.tasks]
    for audit, task in zip(audits, response.tasks, strict=True):
        assert json.loads(audit["after"]) == api_json(task)
        assert audit["before"] is None
        assert audit["actor_key_id"] == uuid.UUID(tenant.writer_key_id)
        assert audit["actor"] and audit["request_id"]
    # The response is built from the request, not read back: it must equal what GetTask reads.
    no_cache = (*tenant.md(), ("cache-control", "no-cache"))
    for task in response.tasks:
        assert await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=no_cache) == task


AGENT_ROW_AND_JSON = f"SELECT {AGENT_COLUMNS_OF.format(a='a.')}, agentstore_agent_json(a)::text AS j FROM agents a"


async def test_agent_json_matches_the_message_encoding(agents_stub, tenant, database: ScratchDatabase) -> None:
    md = tenant.md()
    await create_agent(agents_stub, md, "bare")
    rich = await create_agent(
        agents_stub,
        md,
        'rich ü "quoted" \\ agent',
        role="planner",
        kind="llm",
        capabilities=["python", "sql"],
        metadata={"n": None, "i": 3, "f": 2.5, "nested": {"list": [1, "a", None, {}]}},
    )
    for status in (agent_pb2.AGENT_STATUS_OFFLINE, agent_pb2.AGENT_STATUS_ERROR):
        agent = await create_agent(agents_stub, md, unique("s"))
        heartbeat = agent_pb2.Agent(id=agent.id, status=status)
        heartbeat.last_heartbeat_time.GetCurrentTime()
        await agents_stub.UpdateAgent(
            agent_service_pb2.UpdateAgentRequest(
                agent=heartbeat, update_mask=field_mask_pb2.FieldMask(paths=["status", "last_heartbeat_time"])
            ),
            metadata=md,
        )
    con = await asyncpg.connect(database.owner_url)
    try:
        tenant_id = uuid.UUID(tenant.tenant.id)
        await con.execute(
            "UPDATE agents SET create_time = '2026-03-04T05:06:07Z', update_time = '2026-03-04T05:06:07.250Z' "
            "WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            uuid.UUID(rich.id),
        )
        rows = await con.fetch(f"{AGENT_ROW_AND_JSON} WHERE a.tenant_id = $1", tenant_id)
    finally:
        await con.close()
    assert {agent_from_row(r).status for r in rows} == {
        agent_pb2.AGENT_STATUS_IDLE,
        agent_pb2.AGENT_STATUS_OFFLINE,
        agent_pb2.AGENT_STATUS_ERROR,
    }
    for row in rows:
        expected = api_json(agent_from_row(row))
        assert json.loads(row["j"]) == expected, row["name"]


async def test_agent_create_and_update_audit_rows_equal_the_responses(
    agents_stub, tenant, database: ScratchDatabase
) -> None:
    md = tenant.md()
    created = await create_agent(agents_stub, md, unique("audited"), capabilities=["c"], metadata={"k": "v"})
    patch = agent_pb2.Agent(id=created.id, role="renamed", etag=created.etag)
    patch.metadata.update({"k": None})
    updated = await agents_stub.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent=patch, update_mask=field_mask_pb2.FieldMask(paths=["role", "metadata"])
        ),
        metadata=md,
    )
    con = await asyncpg.connect(database.owner_url)
    try:
        audits = await con.fetch(
            "SELECT action, before::text AS before, after::text AS after, actor_key_id, request_id FROM audit_logs"
            " WHERE tenant_id = $1 AND entity_id = $2 ORDER BY revision",
            uuid.UUID(tenant.tenant.id),
            created.id,
        )
    finally:
        await con.close()
    assert [a["action"] for a in audits] == ["agent.create", "agent.update"]
    create_row, update_row = audits
    assert create_row["before"] is None
    assert json.loads(create_row["after"]) == api_json(created)
    assert json.loads(update_row["before"]) == api_json(created)
    assert json.loads(update_row["after"]) == api_json(updated)
    assert all(a["actor_key_id"] == uuid.UUID(tenant.writer_key_id) and a["request_id"] for a in audits)


def statements(method: str) -> float:
    return REGISTRY.get_sample_value("agentstore_db_statements_total", {"method": method}) or 0.0


async def test_create_and_update_write_their_audit_row_in_the_same_statement(agents_stub, tenant) -> None:
    md = tenant.md()
    await create_agent(agents_stub, md)  # the principal is cached from here on
    before = statements("CreateAgent")
    created = await create_agent(agents_stub, md)
    # BEGIN + tenant, INSERT … with its audit row, COMMIT.
    assert statements("CreateAgent") - before == 3
    before = statements("UpdateAgent")
    await agents_stub.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=created.id, role="r"), update_mask=field_mask_pb2.FieldMask(paths=["role"])
        ),
        metadata=md,
    )
    # BEGIN + tenant, SELECT … FOR UPDATE, UPDATE … with its audit row, COMMIT.
    assert statements("UpdateAgent") - before == 4


@pytest.mark.parametrize(
    "ttl",
    [
        duration_pb2.Duration(seconds=90),
        duration_pb2.Duration(seconds=5, nanos=250_000_000),
        duration_pb2.Duration(seconds=7, nanos=1_000),
    ],
    ids=["whole", "millis", "micros"],
)
async def test_session_audit_rows_equal_the_responses(
    channel, agents_stub, tenant, database: ScratchDatabase, ttl: duration_pb2.Duration
) -> None:
    stub = session_service_pb2_grpc.SessionServiceStub(channel)
    md = tenant.md()
    agent = await create_agent(agents_stub, md)
    session = session_pb2.Session(agent_id=agent.id, user_id="u ü", ttl=ttl)
    session.state.update({"step": "plan", "n": None, "nested": {"list": [1, "a", None, {}]}})
    created = await stub.CreateSession(session_service_pb2.CreateSessionRequest(session=session), metadata=md)
    patch = session_pb2.Session(id=created.id, etag=created.etag)
    patch.state.update({"step": "act"})
    updated = await stub.UpdateSession(
        session_service_pb2.UpdateSessionRequest(
            session=patch, update_mask=field_mask_pb2.FieldMask(paths=["state.step", "user_id"])
        ),
        metadata=md,
    )
    await stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id, etag=updated.etag), metadata=md)
    con = await asyncpg.connect(database.owner_url)
    try:
        audits = await con.fetch(
            "SELECT action, before::text AS before, after::text AS after FROM audit_logs"
            " WHERE tenant_id = $1 AND entity_id = $2 ORDER BY revision",
            uuid.UUID(tenant.tenant.id),
            created.id,
        )
    finally:
        await con.close()
    assert [a["action"] for a in audits] == ["session.create", "session.update", "session.delete"]
    assert audits[0]["before"] is None and json.loads(audits[0]["after"]) == api_json(created)
    assert json.loads(audits[1]["before"]) == api_json(created)
    assert json.loads(audits[1]["after"]) == api_json(updated)
    assert json.loads(audits[2]["before"]) == api_json(updated) and audits[2]["after"] is None
