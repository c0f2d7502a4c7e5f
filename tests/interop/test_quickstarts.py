"""Every quickstart in docs/clients/ runs, unchanged, against a live server and does what it says.

Each prints one JSON object: what it created, got, listed (with a filter, in pages of two), the
role after an update by etag and mask, the typed error of repeating that update, the lease token
and status of a claimed and completed task, a typed INVALID_ARGUMENT, and the health status.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from agentstore.server import App
from tests.integration.conftest import TenantKeys
from tests.integration.helpers import run_command
from tests.interop.test_generated import gopath_with_stubs, needs_go
from tests.interop.tools import REPO, require_node_modules

SERVICE_CONFIG = REPO / "clients" / "python" / "src" / "agentstore" / "client" / "service_config.json"

DOCS = REPO / "docs" / "clients"
TIMEOUT = 120


def canonical_code(code: str) -> str:
    """ABORTED, Aborted and aborted alike (Python/Node print the first, connect-es and Go the second)."""
    return code.replace("_", "").upper()


def check_quickstart(seen: dict[str, object]) -> None:
    created = str(seen["created"])
    assert created.startswith("planner-"), seen
    run = created.removeprefix("planner-")
    assert seen["got_same_etag"] is True
    assert seen["listed"] == [f"planner-{run}", f"worker-{run}-0", f"worker-{run}-1"]
    assert seen["pages"] == 2
    assert seen["updated_role"] == "lead"
    stale = seen["stale_update"]
    assert isinstance(stale, dict)
    assert (canonical_code(stale["code"]), stale["reason"]) == ("ABORTED", "ETAG_MISMATCH")
    assert seen["claimed_lease_token"] == "1"
    assert seen["completed_status"] == "TASK_STATUS_SUCCEEDED"
    error = seen["error"]
    assert isinstance(error, dict)
    assert (canonical_code(error["code"]), error["reason"]) == ("INVALIDARGUMENT", "INVALID_ID")
    assert error["fields"] == ["id"]
    assert seen["health"] == "SERVING"


async def run_quickstart(app: App, tenant: TenantKeys, *argv: str, cwd: Path = REPO) -> dict[str, object]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "AGENTSTORE_ADDRESS": f"127.0.0.1:{app.port}",
        "AGENTSTORE_API_KEY": tenant.writer,
    }
    for name in ("GOPATH", "GO111MODULE", "GOFLAGS", "GOCACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    code, out, err = await run_command(*argv, env=env, cwd=str(cwd), limit=TIMEOUT)
    assert code == 0, f"{' '.join(argv)} exited {code}\nstdout: {out}\nstderr: {err}"
    lines = out.strip().splitlines()
    assert lines, f"no output\nstderr: {err}"
    seen = json.loads(lines[-1])
    assert isinstance(seen, dict)
    return seen


async def test_python_quickstart(app: App, tenant: TenantKeys) -> None:
    check_quickstart(await run_quickstart(app, tenant, sys.executable, str(DOCS / "python" / "quickstart.py")))


async def test_node_quickstart(app: App, tenant: TenantKeys) -> None:
    require_node_modules()
    seen = await run_quickstart(app, tenant, "node", str(DOCS / "node" / "quickstart.mjs"))
    check_quickstart(seen)
    # The Struct, Timestamp and int64 helpers round-trip.
    assert seen["metadata"] == {"region": "eu"}
    assert str(seen["created_at"]).endswith("Z")


async def test_typescript_quickstart(app: App, tenant: TenantKeys, typescript_build: Path) -> None:
    quickstart = typescript_build / "docs" / "clients" / "typescript" / "quickstart.mjs"
    seen = await run_quickstart(app, tenant, "node", str(quickstart))
    check_quickstart(seen)
    assert seen["metadata"] == {"region": "eu"}


@needs_go
async def test_go_quickstart(app: App, tenant: TenantKeys, tmp_path: Path) -> None:
    source = DOCS / "go" / "quickstart" / "main.go"
    assert not run_gofmt(source), "gofmt would change the Go quickstart"
    env = gopath_with_stubs(tmp_path)
    shutil.copytree(source.parent, tmp_path / "gopath" / "src" / "quickstart")
    binary = tmp_path / "quickstart"
    code, out, err = await run_command(
        "go", "build", "-o", str(binary), "quickstart", env=env, cwd=str(tmp_path), limit=600
    )
    assert code == 0, f"go build failed:\n{out}\n{err}"
    check_quickstart(await run_quickstart(app, tenant, str(binary)))


def run_gofmt(path: Path) -> str:
    import subprocess

    return subprocess.run(["gofmt", "-l", str(path)], capture_output=True, text=True, check=True).stdout.strip()


def test_go_quickstart_carries_the_published_service_config() -> None:
    text = (DOCS / "go" / "quickstart" / "main.go").read_text()
    match = re.search(r"const serviceConfig = `(.*?)`", text, flags=re.DOTALL)
    assert match, "no serviceConfig constant in the Go quickstart"
    assert json.loads(match.group(1)) == json.loads(SERVICE_CONFIG.read_text())
