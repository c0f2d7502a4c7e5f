"""TaskService through gRPC against real PostgreSQL and Redis: CRUD, bulk create, search, the queue."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from prometheus_client import REGISTRY

from agentstore.resources.tasks import task_queue
from agentstore.server import App
from agentstore.v1 import (
    achievement_service_pb2,
    achievement_service_pb2_grpc,
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)
from tests.conftest import ScratchDatabase
from tests.integration.helpers import Metadata, create_agent, expect_error, unique


@pytest.fixture(scope="session")
def tasks_stub(channel: grpc.aio.Channel) -> task_service_pb2_grpc.TaskServiceStub:
    return task_service_pb2_grpc.TaskServiceStub(channel)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def statements(method: str) -> float:
    return REGISTRY.get_sample_value("agentstore_db_statements_total", {"method": method}) or 0.0


async def create_task(stub: task_service_pb2_grpc.TaskServiceStub, md: Metadata, **fields: object) -> task_pb2.Task:
    payload = fields.pop("payload", None)
    request_id = str(fields.pop("request_id", ""))
    task = task_pb2.Task(title=str(fields.pop("title", unique("task"))), **fields)  # type: ignore[arg-type]
    if payload is not None:
        task.payload.update(payload)  # type: ignore[arg-type]
    return await stub.CreateTask(task_service_pb2.CreateTaskRequest(task=task, request_id=request_id), metadata=md)


async def claim(
    stub: task_service_pb2_grpc.TaskServiceStub, md: Metadata, agent_id: str, lease: float = 30, **kw: object
) -> task_service_pb2.ClaimTaskResponse:
    return await stub.ClaimTask(
        task_service_pb2.ClaimTaskRequest(agent_id=agent_id, lease_duration=seconds(lease), **kw),  # type: ignore[arg-type]
        metadata=md,
    )


async def get_agent(stub: agent_service_pb2_grpc.AgentServiceStub, md: Metadata, agent_id: str) -> agent_pb2.Agent:
    return await stub.GetAgent(agent_service_pb2.GetAgentRequest(id=agent_id), metadata=md)


async def audit_actions(database: ScratchDatabase, tenant_id: str, entity_id: str) -> list[str]:
    con = await asyncpg.connect(database.owner_url)
    try:
        rows = await con.fetch(
            "SELECT action FROM audit_logs WHERE tenant_id = $1 AND entity_id = $2 ORDER BY revision",
            uuid.UUID(tenant_id),
            entity_id,
        )
    finally:
        await con.close()
    return [r["action"] for r in rows]


# --- standard methods ----------------------------------------------------------------------------


async def test_create_get_update_delete(tasks_stub, tenant) -> None:
    created = await create_task(tasks_stub, tenant.md(), priority=5, payload={"kind": "build"})
    assert created.status == task_pb2.TASK_STATUS_PENDING
    assert created.max_attempts == 3 and created.attempts == 0 and created.etag
    got = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=created.id), metadata=tenant.md("reader"))
    assert got == created
    updated = await tasks_stub.UpdateTask(
        task_service_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=created.id, priority=9, etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
        ),
        metadata=tenant.md(),
    )
    assert updated.priority == 9 and updated.title == created.title and updated.etag != created.etag
    await expect_error(
        tasks_stub.UpdateTask(
            task_service_pb2.UpdateTaskRequest(
                task=task_pb2.Task(id=created.id, priority=1, etag=created.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
            ),
            metadata=tenant.md(),
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    await tasks_stub.DeleteTask(
        task_service_pb2.DeleteTaskRequest(id=created.id, etag=updated.etag), metadata=tenant.md()
    )
    await expect_error(
        tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=created.id), metadata=tenant.md()),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )


async def test_bad_input_is_invalid_argument(tasks_stub, tenant) -> None:
    await expect_error(
        create_task(tasks_stub, tenant.md(), title=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"
    )
    await expect_error(
        create_task(tasks_stub, tenant.md(), max_attempts=500), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"
    )
    await expect_error(
        tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id="nope"), metadata=tenant.md()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ID",
    )
    await expect_error(
        tasks_stub.ListTasks(task_service_pb2.ListTasksRequest(filter="priority >"), metadata=tenant.md()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FILTER",
    )
    created = await create_task(tasks_stub, tenant.md())
    await expect_error(
        tasks_stub.UpdateTask(
            task_service_pb2.UpdateTaskRequest(
                task=task_pb2.Task(id=created.id, status=task_pb2.TASK_STATUS_SUCCEEDED),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=tenant.md(),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
    )


async def test_create_is_idempotent_with_request_id(tasks_stub, tenant) -> None:
    request_id = str(uuid.uuid4())
    first = await create_task(tasks_stub, tenant.md(), request_id=request_id)
    again = await create_task(tasks_stub, tenant.md(), request_id=request_id)
    assert again.id == first.id


async def test_list_filters_and_orders(tasks_stub, tenant) -> None:
    md = tenant.md()
    low = await create_task(tasks_stub, md, priority=1, payload={"team": "a"}, required_capabilities=["python"])
    high = await create_task(tasks_stub, md, priority=10, payload={"team": "b"})
    mid = await create_task(tasks_stub, md, priority=5, payload={"team": "a"})
    response = await tasks_stub.ListTasks(task_service_pb2.ListTasksRequest(order_by="priority desc"), metadata=md)
    assert [t.id for t in response.tasks] == [high.id, mid.id, low.id]
    response = await tasks_stub.ListTasks(
        task_service_pb2.ListTasksRequest(filter='priority >= 5 AND payload.team = "a"'), metadata=md
    )
    assert [t.id for t in response.tasks] == [mid.id]
    response = await tasks_stub.ListTasks(
        task_service_pb2.ListTasksRequest(filter='required_capabilities:"python" AND status = PENDING'), metadata=md
    )
    assert [t.id for t in response.tasks] == [low.id]
    pages, token = [], ""
    while True:
        page = await tasks_stub.ListTasks(
            task_service_pb2.ListTasksRequest(page_size=1, page_token=token, order_by="priority"), metadata=md
        )
        pages.extend(t.id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert pages == [low.id, mid.id, high.id]


# --- bulk create ---------------------------------------------------------------------------------


async def test_batch_create_1000_tasks_in_a_handful_of_statements(tasks_stub, tenant) -> None:
    requests = [
        task_service_pb2.CreateTaskRequest(
            task=task_pb2.Task(title=f"bulk {i}", priority=i % 7, required_capabilities=["c"] * (i % 2))
        )
        for i in range(1000)
    ]
    await tasks_stub.ListTasks(task_service_pb2.ListTasksRequest(page_size=1), metadata=tenant.md())  # key cached
    before = statements("BatchCreateTasks")
    response = await tasks_stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(requests=requests), metadata=tenant.md()
    )
    spent = statements("BatchCreateTasks") - before
    assert [t.title for t in response.tasks] == [f"bulk {i}" for i in range(1000)]
    assert len({t.id for t in response.tasks}) == 1000
    assert list(response.tasks[1].required_capabilities) == ["c"]
    # BEGIN + tenant, one INSERT … unnest that also writes the audit rows, COMMIT.
    assert spent == 3, f"{spent} statements for 1000 tasks"
    listed = await tasks_stub.ListTasks(
        task_service_pb2.ListTasksRequest(filter='title = "bulk 999"'), metadata=tenant.md()
    )
    assert [t.id for t in listed.tasks] == [response.tasks[999].id]


async def test_batch_create_is_all_or_nothing(tasks_stub, tenant) -> None:
    marker = unique("atomic")
    requests = [task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=marker)) for _ in range(10)]
    requests.append(task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title="")))
    failure = await expect_error(
        tasks_stub.BatchCreateTasks(task_service_pb2.BatchCreateTasksRequest(requests=requests), metadata=tenant.md()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
    )
    assert failure.fields == ["requests[10].task.title"]
    listed = await tasks_stub.ListTasks(
        task_service_pb2.ListTasksRequest(filter=f'title = "{marker}"'), metadata=tenant.md()
    )
    assert list(listed.tasks) == []


async def test_batch_create_retry_with_request_ids_returns_the_same_tasks(tasks_stub, tenant) -> None:
    request_ids = [str(uuid.uuid4()) for _ in range(3)]
    requests = [
        task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=f"r{i}"), request_id=r)
        for i, r in enumerate(request_ids)
    ]
    first = await tasks_stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(requests=requests), metadata=tenant.md()
    )
    extra = task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title="new"), request_id=str(uuid.uuid4()))
    second = await tasks_stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(requests=[*requests, extra]), metadata=tenant.md()
    )
    assert [t.id for t in second.tasks[:3]] == [t.id for t in first.tasks]
    assert second.tasks[3].title == "new" and second.tasks[3].id not in {t.id for t in first.tasks}


# --- search --------------------------------------------------------------------------------------


async def test_search_ranks_exact_title_first_and_stays_in_the_tenant(tasks_stub, new_tenant) -> None:
    a, b = await new_tenant("search-a"), await new_tenant("search-b")
    in_description = await create_task(
        tasks_stub, a.md(), title="Nightly job", description="rotate database credentials for the billing database"
    )
    partial = await create_task(tasks_stub, a.md(), title="Rotate database credentials and notify")
    exact = await create_task(tasks_stub, a.md(), title="Rotate database credentials")
    await create_task(tasks_stub, a.md(), title="Unrelated", description="nothing to see")
    await create_task(tasks_stub, b.md(), title="Rotate database credentials")
    response = await tasks_stub.SearchTasks(
        task_service_pb2.SearchTasksRequest(query="rotate database credentials"), metadata=a.md("reader")
    )
    assert [t.id for t in response.tasks] == [exact.id, partial.id, in_description.id]
    first = await tasks_stub.SearchTasks(
        task_service_pb2.SearchTasksRequest(query="rotate database credentials", page_size=2), metadata=a.md()
    )
    assert [t.id for t in first.tasks] == [exact.id, partial.id] and first.next_page_token
    rest = await tasks_stub.SearchTasks(
        task_service_pb2.SearchTasksRequest(
            query="rotate database credentials", page_size=2, page_token=first.next_page_token
        ),
        metadata=a.md(),
    )
    assert [t.id for t in rest.tasks] == [in_description.id] and not rest.next_page_token
    await expect_error(
        tasks_stub.SearchTasks(
            task_service_pb2.SearchTasksRequest(query="other words", page_token=first.next_page_token), metadata=a.md()
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await expect_error(
        tasks_stub.SearchTasks(task_service_pb2.SearchTasksRequest(query="  "), metadata=a.md()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELD",
    )


# --- the queue -----------------------------------------------------------------------------------


async def test_claim_order_capabilities_and_agent_status(tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    worker = await create_agent(agents_stub, md, capabilities=["python"])
    await create_task(tasks_stub, md, priority=1, title="low")
    needs_gpu = await create_task(tasks_stub, md, priority=100, required_capabilities=["gpu"])
    first_high = await create_task(tasks_stub, md, priority=50, required_capabilities=["python"])
    await create_task(tasks_stub, md, priority=50)
    claimed = await claim(tasks_stub, md, worker.id)
    assert claimed.task.id == first_high.id  # gpu task skipped; oldest of the priority-50 pair
    assert claimed.task.status == task_pb2.TASK_STATUS_RUNNING and claimed.task.attempts == 1
    assert claimed.lease_token == 1 and claimed.task.assigned_agent_id == worker.id
    assert (await get_agent(agents_stub, md, worker.id)).status == agent_pb2.AGENT_STATUS_BUSY
    done = await tasks_stub.CompleteTask(
        task_service_pb2.CompleteTaskRequest(task_id=claimed.task.id, lease_token=claimed.lease_token), metadata=md
    )
    assert done.status == task_pb2.TASK_STATUS_SUCCEEDED and done.complete_time.seconds
    assert (await get_agent(agents_stub, md, worker.id)).status == agent_pb2.AGENT_STATUS_IDLE
    second = await claim(tasks_stub, md, worker.id)
    third = await claim(tasks_stub, md, worker.id)
    assert second.task.priority == 50 and third.task.title == "low"
    await expect_error(claim(tasks_stub, md, worker.id), grpc.StatusCode.NOT_FOUND, "NO_TASK_AVAILABLE")
    gpu_task = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=needs_gpu.id), metadata=md)
    assert gpu_task.status == task_pb2.TASK_STATUS_PENDING


async def test_claim_errors(tasks_stub, agents_stub, tenant, new_tenant) -> None:
    md = tenant.md()
    await expect_error(claim(tasks_stub, md, str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    other = await new_tenant("claim-other")
    foreign = await create_agent(agents_stub, other.md())
    await expect_error(claim(tasks_stub, md, foreign.id), grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    offline = await create_agent(agents_stub, md, status=agent_pb2.AGENT_STATUS_OFFLINE)
    await expect_error(claim(tasks_stub, md, offline.id), grpc.StatusCode.FAILED_PRECONDITION, "AGENT_UNAVAILABLE")
    worker = await create_agent(agents_stub, md)
    await expect_error(claim(tasks_stub, md, worker.id, lease=0.5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    await expect_error(
        claim(tasks_stub, tenant.md("reader"), worker.id), grpc.StatusCode.PERMISSION_DENIED, "ROLE_FORBIDDEN"
    )


async def test_eight_workers_drain_1000_tasks_exactly_once(tasks_stub, agents_stub, tenant, database) -> None:
    md = tenant.md()
    await tasks_stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(
            requests=[task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=f"q{i}")) for i in range(1000)]
        ),
        metadata=md,
    )
    workers = [await create_agent(agents_stub, md) for _ in range(8)]
    holders: dict[str, str] = {}  # task id → worker currently holding it
    completed: list[tuple[str, str]] = []
    overlaps: list[str] = []

    async def work(agent_id: str) -> None:
        while True:
            try:
                claimed = await claim(tasks_stub, md, agent_id, lease=60)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return
                raise
            task_id = claimed.task.id
            if task_id in holders:
                overlaps.append(task_id)
            holders[task_id] = agent_id
            await tasks_stub.CompleteTask(
                task_service_pb2.CompleteTaskRequest(task_id=task_id, lease_token=claimed.lease_token), metadata=md
            )
            del holders[task_id]
            completed.append((task_id, agent_id))

    await asyncio.gather(*(work(w.id) for w in workers))
    assert overlaps == []
    assert len(completed) == 1000 and len({t for t, _ in completed}) == 1000
    con = await asyncpg.connect(database.owner_url)
    try:
        tenant_id = uuid.UUID(tenant.tenant.id)
        counts = await con.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'SUCCEEDED') AS succeeded, count(*) AS total,
                      max(attempts) AS max_attempts, max(lease_token) AS max_token
               FROM tasks WHERE tenant_id = $1""",
            tenant_id,
        )
        claims = await con.fetchval(
            "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND action = 'task.claim'", tenant_id
        )
        busy = await con.fetchval("SELECT count(*) FROM agents WHERE tenant_id = $1 AND status <> 'IDLE'", tenant_id)
    finally:
        await con.close()
    assert dict(counts) == {"succeeded": 1000, "total": 1000, "max_attempts": 1, "max_token": 1}
    assert claims == 1000
    assert busy == 0
    assert len({w for _, w in completed}) > 1  # the work was really shared


async def test_lost_lease_cannot_complete_and_the_second_result_wins(app: App, tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    task = await create_task(tasks_stub, md)
    slow, fast = await create_agent(agents_stub, md), await create_agent(agents_stub, md)
    first = await claim(tasks_stub, md, slow.id, lease=1)
    await asyncio.sleep(max(0.0, first.task.lease_expire_time.ToDatetime(UTC).timestamp() - _now()) + 0.05)
    await expect_error(
        tasks_stub.RenewTaskLease(
            task_service_pb2.RenewTaskLeaseRequest(
                task_id=task.id, lease_token=first.lease_token, lease_duration=seconds(30)
            ),
            metadata=md,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
    )
    await app.deps.shared(task_queue).sweep()  # what the background sweeper does every second
    second = await claim(tasks_stub, md, fast.id)
    assert second.task.id == task.id and second.lease_token > first.lease_token and second.task.attempts == 2
    late = tasks_stub.CompleteTask(
        task_service_pb2.CompleteTaskRequest(
            task_id=task.id, lease_token=first.lease_token, result=_struct({"by": "slow"})
        ),
        metadata=md,
    )
    await expect_error(late, grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST")
    unchanged = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md)
    assert unchanged.status == task_pb2.TASK_STATUS_RUNNING and unchanged.etag == second.task.etag
    done = await tasks_stub.CompleteTask(
        task_service_pb2.CompleteTaskRequest(
            task_id=task.id, lease_token=second.lease_token, result=_struct({"by": "fast"})
        ),
        metadata=md,
    )
    assert done.result["by"] == "fast"
    final = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md)
    assert final.result["by"] == "fast" and final.assigned_agent_id == fast.id
    assert (await get_agent(agents_stub, md, slow.id)).status == agent_pb2.AGENT_STATUS_IDLE


async def test_expired_leases_requeue_then_fail_after_max_attempts(app: App, tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    task = await create_task(tasks_stub, md, max_attempts=2)
    worker = await create_agent(agents_stub, md)
    queue = app.deps.shared(task_queue)
    for attempt in (1, 2):
        claimed = await claim(tasks_stub, md, worker.id, lease=1)
        assert claimed.task.attempts == attempt
        await asyncio.sleep(max(0.0, claimed.task.lease_expire_time.ToDatetime(UTC).timestamp() - _now()) + 0.05)
        await queue.sweep()
        after = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md)
        assert after.attempts == attempt and after.error == "lease expired"
        expected = task_pb2.TASK_STATUS_PENDING if attempt == 1 else task_pb2.TASK_STATUS_FAILED
        assert after.status == expected
        assert (await get_agent(agents_stub, md, worker.id)).status == agent_pb2.AGENT_STATUS_IDLE


async def test_the_background_sweeper_requeues_without_help(tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    task = await create_task(tasks_stub, md)
    worker = await create_agent(agents_stub, md)
    await claim(tasks_stub, md, worker.id, lease=1)
    for _ in range(100):
        await asyncio.sleep(0.1)
        current = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md)
        if current.status == task_pb2.TASK_STATUS_PENDING:
            break
    assert current.status == task_pb2.TASK_STATUS_PENDING and current.attempts == 1


async def test_fail_task_retryable_and_final(tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    task = await create_task(tasks_stub, md, max_attempts=2)
    worker = await create_agent(agents_stub, md)
    first = await claim(tasks_stub, md, worker.id)
    retried = await tasks_stub.FailTask(
        task_service_pb2.FailTaskRequest(task_id=task.id, lease_token=first.lease_token, error="flaky", retryable=True),
        metadata=md,
    )
    assert retried.status == task_pb2.TASK_STATUS_PENDING and retried.error == "flaky"
    second = await claim(tasks_stub, md, worker.id)
    failed = await tasks_stub.FailTask(
        task_service_pb2.FailTaskRequest(
            task_id=task.id, lease_token=second.lease_token, error="again", retryable=True
        ),
        metadata=md,
    )
    assert failed.status == task_pb2.TASK_STATUS_FAILED  # out of attempts
    await expect_error(
        tasks_stub.FailTask(
            task_service_pb2.FailTaskRequest(task_id=task.id, lease_token=second.lease_token), metadata=md
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
    )


async def test_cancel_takes_the_lease_away(tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    task = await create_task(tasks_stub, md)
    worker = await create_agent(agents_stub, md)
    claimed = await claim(tasks_stub, md, worker.id)
    cancelled = await tasks_stub.UpdateTask(
        task_service_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, status=task_pb2.TASK_STATUS_CANCELLED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=md,
    )
    assert cancelled.status == task_pb2.TASK_STATUS_CANCELLED
    assert (await get_agent(agents_stub, md, worker.id)).status == agent_pb2.AGENT_STATUS_IDLE
    await expect_error(
        tasks_stub.CompleteTask(
            task_service_pb2.CompleteTaskRequest(task_id=task.id, lease_token=claimed.lease_token), metadata=md
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LEASE_LOST",
    )
    await expect_error(
        tasks_stub.UpdateTask(
            task_service_pb2.UpdateTaskRequest(
                task=task_pb2.Task(id=task.id, status=task_pb2.TASK_STATUS_CANCELLED),
                update_mask=field_mask_pb2.FieldMask(paths=["status"]),
            ),
            metadata=md,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "TASK_FINISHED",
    )


async def test_waiting_claim_gets_a_task_created_later(tasks_stub, agents_stub, tenant) -> None:
    md = tenant.md()
    worker = await create_agent(agents_stub, md)
    waiting = asyncio.ensure_future(
        tasks_stub.ClaimTask(
            task_service_pb2.ClaimTaskRequest(agent_id=worker.id, lease_duration=seconds(30), wait=True),
            metadata=md,
            timeout=10,
        )
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()
    task = await create_task(tasks_stub, md)
    claimed = await waiting
    assert claimed.task.id == task.id
    # Without a task, a waiting claim ends with NOT_FOUND at its deadline, not DEADLINE_EXCEEDED.
    await expect_error(
        tasks_stub.ClaimTask(
            task_service_pb2.ClaimTaskRequest(agent_id=worker.id, lease_duration=seconds(30), wait=True),
            metadata=md,
            timeout=1.5,
        ),
        grpc.StatusCode.NOT_FOUND,
        "NO_TASK_AVAILABLE",
    )


async def test_killed_complete_transaction_leaves_no_partial_state(
    app: App, tasks_stub, agents_stub, tenant, servers, database
) -> None:
    md = tenant.md()
    task = await create_task(tasks_stub, md)
    worker = await create_agent(agents_stub, md)
    claimed = await claim(tasks_stub, md, worker.id)
    service = app.deps.shared(task_queue)
    killed: list[int] = []

    async def kill(con: asyncpg.Connection) -> None:
        pid = con.get_server_pid()
        admin = await asyncpg.connect(servers.admin_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        killed.append(pid)

    service.before_commit = kill
    try:
        await expect_error(
            tasks_stub.CompleteTask(
                task_service_pb2.CompleteTaskRequest(
                    task_id=task.id, lease_token=claimed.lease_token, result=_struct({"ok": True})
                ),
                metadata=md,
            ),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
    finally:
        service.before_commit = None
    assert killed
    current = await tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=md)
    assert current.status == task_pb2.TASK_STATUS_RUNNING and current.etag == claimed.task.etag
    assert (await get_agent(agents_stub, md, worker.id)).status == agent_pb2.AGENT_STATUS_BUSY
    con = await asyncpg.connect(database.owner_url)
    try:
        tenant_id = uuid.UUID(tenant.tenant.id)
        assert (
            await con.fetchval(
                "SELECT completed_task_count FROM agents WHERE tenant_id = $1 AND id = $2",
                tenant_id,
                uuid.UUID(worker.id),
            )
            == 0
        )
        has_achievements = await con.fetchval("SELECT to_regclass('achievements') IS NOT NULL")
        if has_achievements:
            assert await con.fetchval("SELECT count(*) FROM achievements WHERE tenant_id = $1", tenant_id) == 0
    finally:
        await con.close()
    assert "task.complete" not in await audit_actions(database, tenant.tenant.id, task.id)
    # The retry goes through: the same token still holds the lease.
    done = await tasks_stub.CompleteTask(
        task_service_pb2.CompleteTaskRequest(
            task_id=task.id, lease_token=claimed.lease_token, result=_struct({"ok": True})
        ),
        metadata=md,
    )
    assert done.status == task_pb2.TASK_STATUS_SUCCEEDED
    assert (await audit_actions(database, tenant.tenant.id, task.id))[-1] == "task.complete"
    con = await asyncpg.connect(database.owner_url)
    try:
        # What the killed attempt would have written exists now: the checks above could fail.
        awarded = await con.fetch(
            "SELECT code, task_id FROM achievements WHERE tenant_id = $1", uuid.UUID(tenant.tenant.id)
        )
    finally:
        await con.close()
    assert [(r["code"], str(r["task_id"])) for r in awarded] == [("first_task", task.id)]


async def test_completions_award_achievements_and_move_the_leaderboard(
    channel, tasks_stub, agents_stub, tenant
) -> None:
    md = tenant.md()
    achievements = achievement_service_pb2_grpc.AchievementServiceStub(channel)
    star, other = await create_agent(agents_stub, md), await create_agent(agents_stub, md)
    await tasks_stub.BatchCreateTasks(
        task_service_pb2.BatchCreateTasksRequest(
            requests=[task_service_pb2.CreateTaskRequest(task=task_pb2.Task(title=f"a{i}")) for i in range(11)]
        ),
        metadata=md,
    )

    async def run_one(agent_id: str) -> None:
        claimed = await claim(tasks_stub, md, agent_id)
        await tasks_stub.CompleteTask(
            task_service_pb2.CompleteTaskRequest(task_id=claimed.task.id, lease_token=claimed.lease_token), metadata=md
        )

    for _ in range(10):
        await run_one(star.id)
    await run_one(other.id)
    listed = await achievements.ListAchievements(
        achievement_service_pb2.ListAchievementsRequest(agent_id=star.id), metadata=md
    )
    assert sorted(a.code for a in listed.achievements) == ["first_task", "ten_tasks"]
    board = await achievements.GetLeaderboard(achievement_service_pb2.GetLeaderboardRequest(top_n=10), metadata=md)
    assert [e.agent_id for e in board.entries] == [star.id, other.id]
    assert board.entries[0].score > board.entries[1].score > 0


async def test_tasks_of_another_tenant_are_invisible(tasks_stub, new_tenant) -> None:
    a, b = await new_tenant("tasks-a"), await new_tenant("tasks-b")
    task = await create_task(tasks_stub, a.md())
    await expect_error(
        tasks_stub.GetTask(task_service_pb2.GetTaskRequest(id=task.id), metadata=b.md()),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )
    listed = await tasks_stub.ListTasks(task_service_pb2.ListTasksRequest(), metadata=b.md())
    assert task.id not in {t.id for t in listed.tasks}


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _struct(values: dict[str, object]):  # type: ignore[no-untyped-def]
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(values)
    return s
