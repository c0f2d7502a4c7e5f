"""The copy-paste grpcurl workflow against a real server: reflection, JSON in and out, health.

grpcurl runs as an asyncio subprocess: the server under test lives on this event loop, so a
blocking subprocess call would deadlock it.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from agentstore.server import App
from tests.integration.conftest import TenantKeys
from tests.integration.helpers import run_command

GRPCURL = Path(sys.executable).parent / "grpcurl"
TIMEOUT = 60


async def grpcurl(app: App, *args: str, key: str | None = None, data: object = None) -> tuple[int, str, str]:
    command = [str(GRPCURL), "-plaintext", "-max-time", "30"]
    if key is not None:
        command += ["-H", f"authorization: Bearer {key}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [f"127.0.0.1:{app.port}", *args]
    return await run_command(*command, limit=TIMEOUT)


async def test_list_services(app: App) -> None:
    code, out, err = await grpcurl(app, "list")
    assert code == 0, err
    services = set(out.split())
    assert {"agentstore.v1.AgentService", "agentstore.v1.TenantService", "grpc.health.v1.Health"} <= services


async def test_describe_agent_service(app: App) -> None:
    code, out, err = await grpcurl(app, "describe", "agentstore.v1.AgentService")
    assert code == 0, err
    assert "agentstore.v1.AgentService is a service" in out
    for rpc in ("GetAgent", "ListAgents", "CreateAgent", "UpdateAgent", "DeleteAgent", "BatchGetAgents"):
        assert f"rpc {rpc} (" in out, rpc

    code, out, err = await grpcurl(app, "describe", "agentstore.v1.Agent")
    assert code == 0, err
    assert "message Agent" in out and "capabilities" in out


async def test_create_and_list_with_json(app: App, tenant: TenantKeys) -> None:
    name = f"planner-{uuid.uuid4().hex[:6]}"
    body = {"agent": {"name": name, "role": "planner", "capabilities": ["python"], "metadata": {"region": "eu"}}}
    code, out, err = await grpcurl(app, "agentstore.v1.AgentService/CreateAgent", key=tenant.writer, data=body)
    assert code == 0, err
    created = json.loads(out)
    assert uuid.UUID(created["id"])
    assert created["name"] == name
    assert created["capabilities"] == ["python"]
    assert created["metadata"] == {"region": "eu"}
    assert created["etag"]

    other = {"agent": {"name": f"other-{uuid.uuid4().hex[:6]}", "capabilities": ["go"], "metadata": {"region": "us"}}}
    code, out, err = await grpcurl(app, "agentstore.v1.AgentService/CreateAgent", key=tenant.writer, data=other)
    assert code == 0, err

    query = {"filter": 'capabilities:"python" AND metadata.region = "eu"', "order_by": "name"}
    code, out, err = await grpcurl(app, "agentstore.v1.AgentService/ListAgents", key=tenant.reader, data=query)
    assert code == 0, err
    listed = json.loads(out)
    assert [a["id"] for a in listed["agents"]] == [created["id"]]

    code, out, err = await grpcurl(
        app, "agentstore.v1.AgentService/GetAgent", key=tenant.reader, data={"id": created["id"]}
    )
    assert code == 0, err
    assert json.loads(out) == created


async def test_update_with_etag_and_mask_in_json(app: App, tenant: TenantKeys) -> None:
    body = {"agent": {"name": f"updated-{uuid.uuid4().hex[:6]}", "role": "planner"}}
    code, out, err = await grpcurl(app, "agentstore.v1.AgentService/CreateAgent", key=tenant.writer, data=body)
    assert code == 0, err
    created = json.loads(out)
    # grpcurl 1.8 cannot read a FieldMask's canonical JSON string ("role"), only its object form
    # (fullstorydev/grpcurl#393); the README shows this form.
    patch = {
        "agent": {"id": created["id"], "role": "lead", "etag": created["etag"]},
        "update_mask": {"paths": ["role"]},
    }
    code, out, err = await grpcurl(app, "agentstore.v1.AgentService/UpdateAgent", key=tenant.writer, data=patch)
    assert code == 0, err
    updated = json.loads(out)
    assert updated["role"] == "lead" and updated["name"] == created["name"] and updated["etag"] != created["etag"]
    # The old etag no longer matches: ABORTED, with the reason in the details.
    code, _out, err = await grpcurl(app, "agentstore.v1.AgentService/UpdateAgent", key=tenant.writer, data=patch)
    assert code != 0 and "Aborted" in err and "ETAG_MISMATCH" in err, err


async def test_health_check_needs_no_key(app: App) -> None:
    code, out, err = await grpcurl(app, "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}

    code, out, err = await grpcurl(app, "grpc.health.v1.Health/Check", data={"service": "agentstore.v1.AgentService"})
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_create_without_key_is_unauthenticated(app: App) -> None:
    code, _out, err = await grpcurl(app, "agentstore.v1.AgentService/CreateAgent", data={"agent": {"name": "nobody"}})
    assert code != 0
    assert "Code: Unauthenticated" in err, err


async def test_bad_request_prints_invalid_argument(app: App, tenant: TenantKeys) -> None:
    code, _out, err = await grpcurl(app, "agentstore.v1.AgentService/GetAgent", key=tenant.reader, data={"id": "x"})
    assert code != 0
    assert "Code: InvalidArgument" in err, err


async def test_task_queue_round_trip_in_json(app: App, tenant: TenantKeys) -> None:
    """Create, claim (a Duration as "30s") and complete (the int64 token as a JSON string)."""
    code, out, err = await grpcurl(
        app,
        "agentstore.v1.AgentService/CreateAgent",
        key=tenant.writer,
        data={"agent": {"name": f"curl-{uuid.uuid4().hex[:8]}", "capabilities": ["python"]}},
    )
    assert code == 0, err
    agent_id = json.loads(out)["id"]
    code, out, err = await grpcurl(
        app,
        "agentstore.v1.TaskService/CreateTask",
        key=tenant.writer,
        data={"task": {"title": "index the docs", "priority": 3, "requiredCapabilities": ["python"]}},
    )
    assert code == 0, err
    task_id = json.loads(out)["id"]
    code, out, err = await grpcurl(
        app,
        "agentstore.v1.TaskService/ClaimTask",
        key=tenant.writer,
        data={"agent_id": agent_id, "lease_duration": "30s"},
    )
    assert code == 0, err
    claimed = json.loads(out)
    assert "lease_token" in claimed, out
    assert claimed["task"]["id"] == task_id and claimed["task"]["status"] == "TASK_STATUS_RUNNING"
    code, out, err = await grpcurl(
        app,
        "agentstore.v1.TaskService/CompleteTask",
        key=tenant.writer,
        data={"task_id": task_id, "lease_token": claimed["lease_token"], "result": {"pages": 12}},
    )
    assert code == 0, err
    assert json.loads(out)["status"] == "TASK_STATUS_SUCCEEDED"
    code, out, err = await grpcurl(
        app,
        "agentstore.v1.TaskService/CompleteTask",
        key=tenant.writer,
        data={"taskId": task_id, "leaseToken": claimed["lease_token"]},
    )
    assert code != 0 and "LEASE_LOST" in out + err


# --- every grpcurl command of the README, as printed ------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDRESS = "127.0.0.1:50051"


def readme_grpcurl_commands() -> list[str]:
    """The commands of the README's "Try it with grpcurl" block, continuation lines joined."""
    text = README.read_text()
    section = text[text.index("## Try it with grpcurl") :]
    block = section[section.index("```sh\n") + len("```sh\n") : section.index("```\n", section.index("```sh\n") + 6)]
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(pending.strip())
            pending = ""
    return commands


async def test_every_readme_grpcurl_command_works(app: App, tenant: TenantKeys, tmp_path: Path) -> None:
    """Run verbatim, in order, from a directory holding .agentstore/demo-api-key like `make run`'s.
    Only the address (the test server's port) and the `<agent id>`/`<task id>` placeholders, which
    the README asks the reader to fill in from earlier answers, are substituted."""
    commands = readme_grpcurl_commands()
    assert commands[0] == "KEY=$(cat .agentstore/demo-api-key)"
    (tmp_path / ".agentstore").mkdir()
    (tmp_path / ".agentstore" / "demo-api-key").write_text(tenant.writer + "\n")
    env = {"PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path)}
    ids: dict[str, str] = {}
    answers: dict[str, str] = {}
    for command in commands[1:]:
        assert command.startswith("grpcurl "), command
        filled = command.replace(README_ADDRESS, f"127.0.0.1:{app.port}")
        for placeholder, value in ids.items():
            filled = filled.replace(placeholder, value)
        assert "<" not in filled.replace("<<", ""), f"unfilled placeholder in {command}"
        code, out, err = await run_command("bash", "-c", f"{commands[0]}\n{filled}", env=env, cwd=str(tmp_path))
        assert code == 0, f"{command}\nexit {code}\n{out}\n{err}"
        method = filled.split()[-1]
        answers[method] = out
        if method.endswith("/CreateAgent"):
            ids["<agent id>"] = json.loads(out)["id"]
        elif method.endswith("/CreateTask"):
            ids["<task id>"] = json.loads(out)["id"]
    assert "agentstore.v1.AgentService" in answers["list"].split()
    assert "rpc CreateAgent" in answers["agentstore.v1.AgentService"]
    assert json.loads(answers["agentstore.v1.AgentService/CreateAgent"])["metadata"] == {"region": "eu"}
    assert [a["name"] for a in json.loads(answers["agentstore.v1.AgentService/ListAgents"])["agents"]] == ["planner-1"]
    assert json.loads(answers["agentstore.v1.AgentService/UpdateAgent"])["role"] == "lead"
    claimed = json.loads(answers["agentstore.v1.TaskService/ClaimTask"])
    assert claimed["task"]["id"] == ids["<task id>"] and claimed["lease_token"] == "1"
    assert json.loads(answers["agentstore.v1.TaskService/CompleteTask"])["status"] == "TASK_STATUS_SUCCEEDED"
    assert json.loads(answers["grpc.health.v1.Health/Check"]) == {"status": "SERVING"}

    # The README's error example is what the same CreateAgent prints the second time.
    create = next(c for c in commands if c.endswith("agentstore.v1.AgentService/CreateAgent"))
    filled = create.replace(README_ADDRESS, f"127.0.0.1:{app.port}")
    code, out, err = await run_command("bash", "-c", f"{commands[0]}\n{filled}", env=env, cwd=str(tmp_path))
    assert code != 0 and not out
    assert err.strip() == readme_error_example(), err


def readme_error_example() -> str:
    text = README.read_text()
    start = text.index("```\nERROR:\n") + len("```\n")
    return text[start : text.index("```", start)].strip()
