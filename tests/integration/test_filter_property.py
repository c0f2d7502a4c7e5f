"""Property: no filter string reaches PostgreSQL as an error, and none answers UNKNOWN or INTERNAL.

Hypothesis drives a synchronous gRPC channel from a worker thread, so the server keeps running
on the test's event loop. Inputs mix random text with fragments of the filter grammar, so they
reach deep into the parser instead of failing at the first character.
"""

from __future__ import annotations

import asyncio

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentstore.server import App
from agentstore.v1 import agent_service_pb2, agent_service_pb2_grpc, task_service_pb2, task_service_pb2_grpc

FRAGMENTS = [
    "status",
    "priority",
    "payload",
    "payload.kind",
    "metadata.region",
    "required_capabilities",
    "capabilities",
    "create_time",
    "title",
    "assigned_agent_id",
    "name",
    "=",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    ":",
    "AND",
    "OR",
    "NOT",
    "-",
    "(",
    ")",
    '"',
    '"eu"',
    "'x'",
    "1",
    "-1",
    "9223372036854775808",
    "1.5",
    "true",
    "null",
    "*",
    '"2026-01-01T00:00:00Z"',
    '"not a time"',
    '"00000000-0000-0000-0000-000000000000"',
    "PENDING",
    "TASK_STATUS_RUNNING",
    "AGENT_STATUS_IDLE",
    "\\",
    "\x00",
    "é",
    ".",
    ",",
    " ",
]
filters = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map(" ".join),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12).map("".join),
)
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


async def test_no_filter_string_produces_a_server_error(app: App, tenant) -> None:
    md = tenant.md("reader")
    seen: list[tuple[str, str, grpc.StatusCode]] = []

    def run() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            agents = agent_service_pb2_grpc.AgentServiceStub(channel)

            @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
            @given(text=filters)
            def check(text: str) -> None:
                for name, call in (
                    ("ListTasks", lambda: tasks.ListTasks(task_service_pb2.ListTasksRequest(filter=text), metadata=md)),
                    (
                        "ListAgents",
                        lambda: agents.ListAgents(agent_service_pb2.ListAgentsRequest(filter=text), metadata=md),
                    ),
                ):
                    try:
                        call()
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as exc:
                        code = exc.code()  # type: ignore[attr-defined]
                    seen.append((name, text, code))
                    assert code in ACCEPTABLE, f"{name} filter {text!r} answered {code.name}"

            check()

    await asyncio.to_thread(run)
    codes = {code for _, _, code in seen}
    # Both outcomes occurred: the generator produced valid filters as well as malformed ones.
    assert codes == ACCEPTABLE, codes
