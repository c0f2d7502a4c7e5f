"""Real servers for the whole suite.

AGENTSTORE_TEST_DATABASE_URL (a role that may create databases and roles) and
AGENTSTORE_TEST_REDIS_URL pick existing servers; without them the embedded PostgreSQL and Redis
of agentstore.devtools.embedded start under a temporary directory. Each run gets its own database and
Redis key prefix and removes both afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis

from agentstore import migrate
from agentstore.dsn import replace_dsn

REPO = Path(__file__).resolve().parents[1]
MIGRATIONS = REPO / "migrations"
APP_ROLE = "agentstore_test_app"
APP_PASSWORD = "agentstore-test-password"


@dataclass(frozen=True)
class Servers:
    # The server's superuser/owner URL, pointing at the maintenance database.
    admin_url: str
    redis_url: str


@dataclass(frozen=True)
class ScratchDatabase:
    owner_url: str
    app_url: str
    name: str


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    db_url = os.environ.get("AGENTSTORE_TEST_DATABASE_URL")
    redis_url = os.environ.get("AGENTSTORE_TEST_REDIS_URL")
    started: list[object] = []
    base: Path | None = None
    if not db_url or not redis_url:
        from agentstore.devtools.embedded import EmbeddedPostgres, EmbeddedRedis

        # Not under pytest's basetemp: another pytest run on the machine prunes old basetemps,
        # which would pull the data directory from under a running server.
        base = Path(tempfile.mkdtemp(prefix="agentstore-test-"))
        if not db_url:
            pg = EmbeddedPostgres(base / "pg", require_password=True)
            db_url = pg.start()
            started.append(pg)
        if not redis_url:
            rd = EmbeddedRedis(base / "redis", append_only=False)
            redis_url = rd.start()
            started.append(rd)
    try:
        yield Servers(db_url, redis_url)
    finally:
        for server in reversed(started):
            server.stop()  # type: ignore[attr-defined]
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)


async def create_empty_database(admin_url: str, name: str) -> str:
    """A new database with nothing in it; returns the admin URL pointed at it."""
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    return replace_dsn(admin_url, database=name)


async def create_database(admin_url: str, name: str) -> ScratchDatabase:
    """A migrated database and the application role's URL for it."""
    owner_url = await create_empty_database(admin_url, name)
    con = await asyncpg.connect(admin_url)
    try:
        exists = await con.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE)
        if not exists:
            try:
                await con.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}'")
            except asyncpg.DuplicateObjectError:
                pass  # a concurrent run created it
    finally:
        await con.close()
    migrate.apply(owner_url, MIGRATIONS)
    con = await asyncpg.connect(owner_url)
    try:
        await con.execute(f"GRANT agentstore_app TO {APP_ROLE}")
    finally:
        await con.close()
    return ScratchDatabase(owner_url, replace_dsn(owner_url, user=APP_ROLE, password=APP_PASSWORD), name)


async def drop_database(admin_url: str, name: str) -> None:
    con = await asyncpg.connect(admin_url)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


@pytest.fixture(scope="session")
async def database(servers: Servers) -> AsyncIterator[ScratchDatabase]:
    name = f"agentstore_test_{uuid.uuid4().hex[:12]}"
    db = await create_database(servers.admin_url, name)
    yield db
    await drop_database(servers.admin_url, name)


@pytest.fixture(scope="session")
def redis_prefix(servers: Servers) -> Iterator[str]:
    prefix = f"agentstore-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(servers.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
