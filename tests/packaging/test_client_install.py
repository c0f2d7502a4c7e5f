"""A fresh venv installs agentstore-client from the repository, pulls in only grpcio, protobuf and
googleapis-common-protos, and runs the README's ten-line client against a live server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from agentstore.server import App
from tests.integration.conftest import TenantKeys
from tests.integration.helpers import run_command

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
INSTALL_TIMEOUT = 600

pytestmark = pytest.mark.slow

# What `pip install ./clients/python` may bring: the client and what it declares (and theirs).
ALLOWED = {
    "agentstore-client",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",  # grpcio's
    "pip",
    "setuptools",  # the venv's own
}


def readme_python_client() -> str:
    text = README.read_text()
    section = text[text.index("## Clients") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


async def test_readme_client_runs_from_a_fresh_client_only_venv(app: App, tenant: TenantKeys, tmp_path: Path) -> None:
    code_lines = [line for line in readme_python_client().splitlines() if line.strip()]
    assert len(code_lines) <= 10, "the README promises ten lines"
    venv = tmp_path / "venv"
    code, out, err = await run_command(sys.executable, "-m", "venv", str(venv), limit=120)
    assert code == 0, err
    python = str(venv / "bin" / "python")
    code, out, err = await run_command(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        str(REPO / "clients" / "python"),
        limit=INSTALL_TIMEOUT,
    )
    assert code == 0, f"pip install failed:\n{out}\n{err}"
    listing = "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"
    code, out, err = await run_command(python, "-c", listing, limit=60)
    assert code == 0, err
    installed = {name.lower().replace("_", "-") for name in json.loads(out)}
    assert installed - ALLOWED == set(), f"the client pulled in more than it should: {sorted(installed - ALLOWED)}"

    program = tmp_path / "client.py"
    program.write_text(readme_python_client().replace("127.0.0.1:50051", f"127.0.0.1:{app.port}"))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AGENTSTORE_API_KEY": tenant.writer}
    code, out, err = await run_command(python, str(program), env=env, cwd=str(tmp_path), limit=60)
    assert code == 0, f"the README client failed:\n{out}\n{err}"
    printed = [line.split() for line in out.splitlines()]
    assert [name for name, _etag in printed] == ["reviewer-1"]
