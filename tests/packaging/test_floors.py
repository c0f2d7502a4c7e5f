"""The declared dependency floors are true: a fresh venv holding exactly those versions runs everything.

pyproject.toml (agentstore-server) and clients/python/pyproject.toml (agentstore-client) declare one
`>=` floor for every runtime dependency. Here every one of them is pinned to `==floor`, both
distributions are built as real wheels (not editable) and installed into a new venv, the wheels are
checked for the stubs, `.pyi` and `.proto` files, every stub is imported, and `agentstore serve`
runs against the test database until its health check answers SERVING, where client_usage.py
calls it through agentstore.client. The same venv, with types-grpcio and types-protobuf, checks
that client_usage.py and the Python quickstart (users of the installed client) pass `mypy --strict`.

The generated stubs refuse a protobuf runtime older than the protoc that generated them, and a
grpcio older than grpcio-tools: this is the test that catches a floor below either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ScratchDatabase, Servers
from tests.integration.helpers import run_command
from tests.integration.test_startup import serve_env, start_serving

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "python"
STUB_DIR = CLIENT / "src" / "agentstore" / "v1"
CLIENT_USAGE = Path(__file__).with_name("client_usage.py")
PYTHON_QUICKSTART = REPO / "docs" / "clients" / "python" / "quickstart.py"
PLATFORM_TOKEN = "floors-platform-token"
# What a user type-checking against the client needs; unpinned, like a user's.
TYPING_TOOLS = ("mypy", "types-grpcio", "types-grpcio-health-checking", "types-protobuf")
OURS = {"agentstore-client", "agentstore-server"}
INSTALL_TIMEOUT = 600
EXIT_TIMEOUT = 30

pytestmark = pytest.mark.slow


def declared_floors(pyproject: Path) -> dict[str, Version]:
    """{name: floor} of the runtime dependencies that apply on this machine."""
    project = tomllib.loads(pyproject.read_text())["project"]
    floors: dict[str, Version] = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in OURS or (requirement.marker is not None and not requirement.marker.evaluate()):
            continue
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{pyproject.name}: {line!r} should declare exactly one >= floor"
        floors[name] = lower[0]
    return floors


def all_floors() -> dict[str, Version]:
    client = declared_floors(CLIENT / "pyproject.toml")
    server = declared_floors(REPO / "pyproject.toml")
    for name in client.keys() & server.keys():
        assert client[name] == server[name], f"{name}: client floor {client[name]} != server floor {server[name]}"
    return client | server


@dataclass(frozen=True)
class FloorVenv:
    root: Path
    floors: dict[str, Version]

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    async def run_python(self, code: str, limit: float = 60) -> str:
        code_, out, err = await run_command(str(self.python), "-c", code, limit=limit)
        assert code_ == 0, f"exit {code_}\nstdout: {out}\nstderr: {err}"
        return out


async def _checked(*argv: str, limit: float = INSTALL_TIMEOUT) -> str:
    code, out, err = await run_command(*argv, limit=limit)
    assert code == 0, f"{' '.join(argv)} exited {code}\nstdout: {out}\nstderr: {err}"
    return out


@pytest.fixture(scope="module")
async def floor_venv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FloorVenv]:
    base = tmp_path_factory.mktemp("floors")
    floors = all_floors()
    constraints = base / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(floors.items())))
    venv = FloorVenv(base / "venv", floors)
    await _checked(sys.executable, "-m", "venv", str(venv.root))
    pip = (str(venv.python), "-m", "pip", "--disable-pip-version-check", "--no-input")
    # Non-editable: pip builds both wheels, so what they carry is what a user would get. From copies
    # of the sources, so that a checkout's stale build/ directories cannot leak into the wheels.
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "node_modules", ".venv")
    client, server = base / "sources" / "client", base / "sources" / "server"
    shutil.copytree(CLIENT, client, ignore=ignore)
    shutil.copytree(REPO / "src", server / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, server / name)
    await _checked(*pip, "install", "--quiet", "-c", str(constraints), str(client), str(server), *TYPING_TOOLS)
    yield venv


def test_floors_are_declared() -> None:
    floors = all_floors()
    # The stubs' own floors: gencode 5.27.2 and grpcio-tools 1.66.2 (clients/python/requirements-protoc.txt).
    assert floors["protobuf"] == Version("5.27.2")
    assert floors["grpcio"] == Version("1.66.2")


async def test_the_venv_holds_exactly_the_floors(floor_venv: FloorVenv) -> None:
    listed = json.loads(await floor_venv.run_python(_PIP_LIST))
    installed = {canonicalize_name(name): Version(version) for name, version in listed.items()}
    floors = floor_venv.floors
    wrong = {name: str(installed.get(name)) for name, floor in floors.items() if installed.get(name) != floor}
    assert not wrong, f"not at their floors: {wrong}"
    assert {"agentstore-client", "agentstore-server"} <= installed.keys()


_PIP_LIST = """
import importlib.metadata as m, json
print(json.dumps({d.metadata["Name"]: d.version for d in m.distributions()}))
"""

_IMPORT_STUBS = """
import importlib, json, pkgutil, pathlib
import agentstore.v1 as v1
names = sorted(m.name for m in pkgutil.iter_modules(v1.__path__))
for name in names:
    importlib.import_module(f"agentstore.v1.{name}")
import google.protobuf, grpc
print(json.dumps({
    "modules": names,
    "files": sorted(p.name for p in pathlib.Path(v1.__file__).parent.iterdir()),
    "protobuf": google.protobuf.__version__,
    "grpcio": grpc.__version__,
}))
"""


async def test_every_stub_imports_at_the_floors(floor_venv: FloorVenv) -> None:
    found = json.loads(await floor_venv.run_python(_IMPORT_STUBS))
    assert found["protobuf"] == str(floor_venv.floors["protobuf"])
    assert found["grpcio"] == str(floor_venv.floors["grpcio"])
    committed = sorted(p.stem for p in STUB_DIR.glob("*_pb2*.py"))
    assert committed and found["modules"] == committed
    # The client wheel carries the .pyi files, the .proto sources and the PEP 561 marker.
    expected = {p.name for p in STUB_DIR.iterdir() if p.suffix in {".py", ".pyi", ".proto"} or p.name == "py.typed"}
    assert expected <= set(found["files"]), sorted(expected - set(found["files"]))


async def test_the_server_serves_at_the_floors(
    floor_venv: FloorVenv, servers: Servers, database: ScratchDatabase, redis_prefix: str, tmp_path: Path
) -> None:
    processes: list[asyncio.subprocess.Process] = []
    env = serve_env(servers, database.app_url, redis_prefix, AGENTSTORE_PLATFORM_ADMIN_TOKEN=PLATFORM_TOKEN)
    try:
        served = await start_serving(processes, env, tmp_path, executable=floor_venv.root / "bin" / "agentstore")
        code, out, err = await run_command(
            str(floor_venv.python), str(CLIENT_USAGE), served.address, PLATFORM_TOKEN, limit=120
        )
        assert code == 0, f"client_usage.py exited {code}\nstdout: {out}\nstderr: {err}\nserver: {served.stderr()}"
        assert json.loads(out) == {
            "sync_names": ["a", "b", "c"],
            "sync_reason": "AGENT_NAME_TAKEN",
            "async_names": ["a", "b", "c"],
            "async_error": ["INVALID_ARGUMENT", "INVALID_ID", "id"],
        }
        served.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(served.proc.wait(), timeout=EXIT_TIMEOUT)
        assert code == 0, served.stderr()
    finally:
        for proc in processes:
            if proc.returncode is None:
                proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=10)


async def test_a_client_program_passes_mypy_strict(floor_venv: FloorVenv, tmp_path: Path) -> None:
    # Checked as a user would: the installed wheel (PEP 561, namespace package) with grpc stubs.
    code, out, err = await run_command(
        str(floor_venv.root / "bin" / "mypy"),
        "--strict",
        "--cache-dir",
        str(tmp_path / "mypy-cache"),
        str(CLIENT_USAGE),
        str(PYTHON_QUICKSTART),
        cwd=str(tmp_path),
        limit=300,
    )
    assert code == 0, f"mypy --strict failed:\n{out}\n{err}"
