"""The Node workflow (tests/interop/node/workflow.mjs) against a live server: every service through
@grpc/grpc-js + @grpc/proto-loader with the quickstart's loader options and helpers."""

from __future__ import annotations

import json
import os

from agentstore.server import App
from tests.integration.conftest import TenantKeys
from tests.integration.helpers import run_command
from tests.interop.tools import REPO, require_node_modules

WORKFLOW = REPO / "tests" / "interop" / "node" / "workflow.mjs"


async def run_workflow(app: App, tenant: TenantKeys, *argv: str) -> dict[str, object]:
    require_node_modules()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "AGENTSTORE_ADDRESS": f"127.0.0.1:{app.port}",
        "AGENTSTORE_WRITER_KEY": tenant.writer,
        "AGENTSTORE_ADMIN_KEY": tenant.admin,
    }
    code, out, err = await run_command(*argv, env=env, cwd=str(REPO), limit=120)
    assert code == 0, f"{' '.join(argv)} exited {code}\nstdout: {out}\nstderr: {err}"
    seen = json.loads(out.strip().splitlines()[-1])
    assert isinstance(seen, dict)
    return seen


def failure(code: str, reason: str, *fields: str) -> dict[str, object]:
    return {"code": code, "reason": reason, "domain": "agentstore", "fields": list(fields)}


def canonical(value: object) -> object:
    """Status codes as ABORTED whether a client prints ABORTED (grpc-js) or Aborted (connect-es)."""
    if isinstance(value, dict):
        return {k: canonical_code(v) if k == "code" else canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def canonical_code(code: object) -> object:
    return str(code).replace("_", "").upper()


def check_workflow(seen: dict[str, object]) -> None:
    """What every interop workflow (Node, TypeScript) must have seen."""
    seen = canonical(seen)  # type: ignore[assignment]
    run = seen["run"]
    assert seen["agent"] == {
        "metadata": {"region": "eu", "n": 2},
        "status": "AGENT_STATUS_IDLE",
        "created_recently": True,
        "got": True,
        "listed": [f"agent-{run}", f"doomed-{run}"],
        "updated_role": "lead",
        "stale": canonical(failure("ABORTED", "ETAG_MISMATCH")),
        "delete_stale": canonical(failure("ABORTED", "ETAG_MISMATCH")),
        "after_delete": canonical(failure("NOT_FOUND", "AGENT_NOT_FOUND")),
    }
    assert seen["task"] == {
        "claimed_same": True,
        "lease_token": "1",
        "status": "TASK_STATUS_SUCCEEDED",
        "result": {"pages": 12},
        "complete_again": canonical(failure("FAILED_PRECONDITION", "LEASE_LOST")),
    }
    assert seen["session"] == {
        # UpdateSession with the mask "state.step" changed that key alone.
        "got_state": {"step": 2, "notes": "start"},
        "expires_later": True,
        "listed": True,
        "after_delete": canonical(failure("NOT_FOUND", "SESSION_NOT_FOUND")),
    }
    # Completing the first task earned `first_task` (10 points): the tenant's only scorer.
    assert seen["achievements"] == ["first_task"]
    assert seen["leaderboard"] == [{"score": "10", "rank": 1}]
    audit = seen["audit"]
    assert isinstance(audit, list) and audit[-1] == "agent.create" and "agent.update" in audit
    assert seen["errors"] == {
        "invalid_field": canonical(failure("INVALID_ARGUMENT", "INVALID_FIELD", "agent.name")),
        "bad_filter": canonical(failure("INVALID_ARGUMENT", "INVALID_FILTER", "filter")),
        "unauthenticated": canonical(failure("UNAUTHENTICATED", "API_KEY_MISSING")),
    }
    assert seen["health"] == {"check": "SERVING", "watch": "SERVING"}


async def test_node_workflow(app: App, tenant: TenantKeys) -> None:
    check_workflow(await run_workflow(app, tenant, "node", str(WORKFLOW)))
