"""The real `agentstore` console script: refusing unsafe roles, bad config, signals, reflection.

Every process gets an environment with only what it needs, every wait is bounded, and every
process still running when a test ends is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentstore.dsn import replace_dsn
from tests.conftest import APP_PASSWORD, APP_ROLE, Servers, create_database, create_empty_database, drop_database
from tests.conftest import ScratchDatabase as Db
from tests.integration.helpers import run_command

BIN = Path(sys.executable).parent
AGENTSTORE = BIN / "agentstore"
GRPCURL = BIN / "grpcurl"
EXIT_TIMEOUT = 30
READY_TIMEOUT = 30
GRACE_SECONDS = 2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def base_env(**values: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(values)
    return env


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    address: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
async def processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=10)


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run the console script to completion (bounded) and return (exit code, stdout, stderr)."""
    return await run_command(str(AGENTSTORE), *args, env=env, limit=EXIT_TIMEOUT)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{stderr}"
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_env(servers: Servers, database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return base_env(
        AGENTSTORE_DATABASE_URL=database_url,
        AGENTSTORE_REDIS_URL=servers.redis_url,
        AGENTSTORE_REDIS_KEY_PREFIX=prefix,
        AGENTSTORE_LISTEN_ADDRESS=f"127.0.0.1:{free_port()}",
        **extra,
    )


async def refused(env: dict[str, str]) -> str:
    code, out, err = await run_cli("serve", env=env)
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    return one_line(err)


# --- unsafe database roles --------------------------------------------------------------------


async def test_superuser_is_refused(servers: Servers, database: Db, redis_prefix: str) -> None:
    superuser_url = replace_dsn(servers.admin_url, database=database.name)
    line = await refused(serve_env(servers, superuser_url, redis_prefix))
    assert "superuser" in line


@pytest.fixture
async def scratch(servers: Servers) -> AsyncIterator[Db]:
    """A migrated database of its own, dropped afterwards."""
    name = f"agentstore_startup_{uuid.uuid4().hex[:12]}"
    db = await create_database(servers.admin_url, name)
    try:
        yield db
    finally:
        await drop_database(servers.admin_url, name)


@pytest.fixture
async def make_role(servers: Servers) -> AsyncIterator[object]:
    """Creates LOGIN roles for one test and drops them (after their databases are gone)."""
    created: list[str] = []

    async def make(attributes: str = "") -> str:
        name = f"agentstore_startup_{uuid.uuid4().hex[:10]}"
        con = await asyncpg.connect(servers.admin_url)
        try:
            await con.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{APP_PASSWORD}' {attributes}")
            await con.execute(f"GRANT agentstore_app TO {name}")
        finally:
            await con.close()
        created.append(name)
        return name

    yield make
    con = await asyncpg.connect(servers.admin_url)
    try:
        for name in reversed(created):
            await con.execute(f"DROP ROLE IF EXISTS {name}")
    finally:
        await con.close()


async def test_role_owning_a_table_is_refused(servers: Servers, scratch: Db, redis_prefix: str, make_role) -> None:
    owner = await make_role()
    member = await make_role()
    con = await asyncpg.connect(scratch.owner_url)
    try:
        await con.execute("CREATE TABLE startup_owned (id int)")
        await con.execute(f"ALTER TABLE startup_owned OWNER TO {owner}")
        await con.execute(f"GRANT {owner} TO {member}")
    finally:
        await con.close()
    try:
        line = await refused(
            serve_env(servers, replace_dsn(scratch.owner_url, user=owner, password=APP_PASSWORD), redis_prefix)
        )
        assert "owns tables" in line
        # Membership in the owner is ownership too: it can ALTER or DROP the table's policies.
        line = await refused(
            serve_env(servers, replace_dsn(scratch.owner_url, user=member, password=APP_PASSWORD), redis_prefix)
        )
        assert "owns tables" in line
    finally:
        con = await asyncpg.connect(scratch.owner_url)
        try:
            await con.execute("DROP TABLE startup_owned")
        finally:
            await con.close()


async def test_bypassrls_role_is_refused(servers: Servers, database: Db, redis_prefix: str, make_role) -> None:
    role = await make_role("BYPASSRLS")
    line = await refused(
        serve_env(servers, replace_dsn(database.app_url, user=role, password=APP_PASSWORD), redis_prefix)
    )
    assert "BYPASSRLS" in line


async def test_unmigrated_database_is_refused(servers: Servers, database: Db, redis_prefix: str) -> None:
    # `database` made sure the application role exists.
    name = f"agentstore_startup_{uuid.uuid4().hex[:12]}"
    admin_url = await create_empty_database(servers.admin_url, name)
    try:
        url = replace_dsn(admin_url, user=APP_ROLE, password=APP_PASSWORD)
        line = await refused(serve_env(servers, url, redis_prefix))
        assert "migrate" in line
    finally:
        await drop_database(servers.admin_url, name)


# --- bad configuration ------------------------------------------------------------------------


async def test_bad_integer_setting_names_the_variable(servers: Servers, database: Db, redis_prefix: str) -> None:
    env = serve_env(servers, database.app_url, redis_prefix, AGENTSTORE_DB_POOL_MAX_SIZE="abc")
    line = await refused(env)
    assert "AGENTSTORE_DB_POOL_MAX_SIZE" in line


async def test_serve_without_database_url_names_it(servers: Servers, redis_prefix: str) -> None:
    env = base_env(AGENTSTORE_REDIS_URL=servers.redis_url, AGENTSTORE_REDIS_KEY_PREFIX=redis_prefix)
    line = await refused(env)
    assert "AGENTSTORE_DATABASE_URL" in line


# --- a serving process ------------------------------------------------------------------------


async def start_serving(
    processes: list[asyncio.subprocess.Process], env: dict[str, str], tmp_path: Path, executable: Path = AGENTSTORE
) -> Served:
    stderr_path = tmp_path / f"serve-{len(processes)}.stderr"
    with stderr_path.open("wb") as stderr:
        # stderr to a file: a pipe nobody reads could fill up and stall the server.
        proc = await asyncio.create_subprocess_exec(
            str(executable),
            "serve",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    processes.append(proc)
    served = Served(proc, env["AGENTSTORE_LISTEN_ADDRESS"], stderr_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.returncode is not None:
                pytest.fail(f"agentstore serve exited {proc.returncode} before serving:\n{served.stderr()}")
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if response.status == SERVING:
                    return served
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                pytest.fail(f"agentstore serve did not become SERVING in time:\n{served.stderr()}")
            await asyncio.sleep(0.1)


async def wait_exit(served: Served, limit: float) -> int:
    try:
        return await asyncio.wait_for(served.proc.wait(), timeout=limit)
    except TimeoutError:
        pytest.fail(f"the server did not exit within {limit} s of the signal:\n{served.stderr()}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_graceful_shutdown(
    servers: Servers, database: Db, redis_prefix: str, processes, sig: signal.Signals, tmp_path: Path
) -> None:
    env = serve_env(
        servers,
        database.app_url,
        redis_prefix,
        AGENTSTORE_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        AGENTSTORE_HEALTH_PROBE_INTERVAL_SECONDS="0.2",
    )
    served = await start_serving(processes, env, tmp_path)

    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=EXIT_TIMEOUT)
        first = await asyncio.wait_for(watch.read(), timeout=READY_TIMEOUT)
        assert first is not grpc.aio.EOF and first.status == SERVING

        served.proc.send_signal(sig)

        seen: list[int] = []
        ended = False
        try:
            while True:
                message = await asyncio.wait_for(watch.read(), timeout=EXIT_TIMEOUT)
                if message is grpc.aio.EOF:
                    ended = True
                    break
                seen.append(message.status)
                if message.status == NOT_SERVING:
                    break
        except grpc.aio.AioRpcError:
            ended = True  # the server closed the stream while shutting down
        assert NOT_SERVING in seen or ended, seen
        watch.cancel()

    code = await wait_exit(served, GRACE_SECONDS + EXIT_TIMEOUT)
    assert code == 0, served.stderr()


@pytest.mark.slow
async def test_reflection_can_be_turned_off(
    servers: Servers, database: Db, redis_prefix: str, processes, tmp_path: Path
) -> None:
    env = serve_env(
        servers,
        database.app_url,
        redis_prefix,
        AGENTSTORE_REFLECTION_ENABLED="false",
        AGENTSTORE_SHUTDOWN_GRACE_SECONDS="0",
    )
    served = await start_serving(processes, env, tmp_path)
    address = served.address

    grpcurl = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-plaintext",
        "-max-time",
        "20",
        address,
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(grpcurl.communicate(), timeout=EXIT_TIMEOUT)
    finally:
        if grpcurl.returncode is None:
            grpcurl.kill()
            await grpcurl.wait()
    assert grpcurl.returncode != 0, out.decode()
    assert "reflection" in err.decode().lower() or "unimplemented" in err.decode().lower(), err.decode()

    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "agentstore.v1.AgentService"):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == SERVING

    served.proc.send_signal(signal.SIGTERM)
    code = await wait_exit(served, EXIT_TIMEOUT)
    assert code == 0, served.stderr()
