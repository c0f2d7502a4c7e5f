"""The migrations on a fresh database: schema shape, RLS, index layout, rollback, and the CLI.

Each test makes its own database as the admin role and drops it at the end, so applying and
rolling back never touches the session's shared test database.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from agentstore import migrate
from tests.conftest import MIGRATIONS, REPO, Servers, create_empty_database, drop_database
from tests.integration.helpers import run_command

TENANT_TABLES = ("tenants", "api_keys", "agents", "audit_logs", "create_requests", "tasks", "sessions", "achievements")
# Tables whose rows belong to one tenant through a tenant_id column.
TENANT_SCOPED = ("api_keys", "agents", "audit_logs", "create_requests", "tasks", "sessions", "achievements")
AGENTSTORE_FUNCTIONS = (
    "agentstore_current_tenant",
    "agentstore_scoped_tags",
    "agentstore_scoped_json",
    "agentstore_scoped_search",
    "agentstore_scoped_query",
    "agentstore_read_agents",
    "agentstore_read_tasks",
    "agentstore_read_api_key",
    "agentstore_proto_time",
    "agentstore_task_json",
    "agentstore_agent_json",
    "agentstore_proto_duration",
    "agentstore_session_json",
    "agentstore_read_sessions",
)
AGENTSTORE_BIN = Path(sys.executable).parent / "agentstore"
CLI_TIMEOUT = 60
# Every migration in the repository, in the order yoyo applies them (each depends on the one before).
ALL = sorted(p.stem for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql") if not p.name.endswith(".rollback.sql"))


@pytest.fixture
async def fresh_db(servers: Servers) -> AsyncIterator[str]:
    """An empty database (no migrations); yields the owner URL for it."""
    name = f"agentstore_mig_{uuid.uuid4().hex[:12]}"
    url = await create_empty_database(servers.admin_url, name)
    try:
        yield url
    finally:
        await drop_database(servers.admin_url, name)


async def _user_relations(con: asyncpg.Connection) -> set[str]:
    """Tables, views, sequences and indexes in user schemas, except yoyo's own bookkeeping."""
    rows = await con.fetch(
        """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
        """
    )
    return {r["relname"] for r in rows if not r["relname"].startswith(("_yoyo", "yoyo"))}


async def _agentstore_functions(con: asyncpg.Connection) -> set[str]:
    rows = await con.fetch("SELECT proname FROM pg_proc WHERE proname LIKE 'agentstore\\_%'")
    return {r["proname"] for r in rows}


async def _check_schema(owner_url: str) -> None:
    con = await asyncpg.connect(owner_url)
    try:
        rows = await con.fetch(
            """
            SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
            """
        )
        tables = {r["relname"]: r for r in rows}
        for table in TENANT_TABLES:
            assert table in tables, f"table {table} missing after apply"
            assert tables[table]["relrowsecurity"], f"{table}: row-level security is not enabled"
            assert tables[table]["relforcerowsecurity"], f"{table}: row-level security is not forced"

        policies = await con.fetch("SELECT tablename, policyname FROM pg_policies WHERE schemaname = 'public'")
        with_policy = {r["tablename"] for r in policies}
        assert set(TENANT_TABLES) <= with_policy, f"tables without a policy: {set(TENANT_TABLES) - with_policy}"

        indexes = await con.fetch(
            """
            SELECT t.relname AS table_name, i.relname AS index_name, x.indkey[0] AS first_attnum,
                   pg_get_indexdef(x.indexrelid, 1, true) AS first_key,
                   pg_get_indexdef(x.indexrelid) AS definition
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE n.nspname = 'public' AND t.relname = ANY($1::text[])
            ORDER BY 1, 2
            """,
            list(TENANT_TABLES),
        )
        by_table: dict[str, list[asyncpg.Record]] = {}
        for index in indexes:
            by_table.setdefault(index["table_name"], []).append(index)
        assert set(by_table) == set(TENANT_TABLES)

        bad: list[str] = []
        for table in TENANT_SCOPED:
            for index in by_table[table]:
                first = index["first_key"]
                if index["first_attnum"] != 0:
                    # A plain column: it must be tenant_id itself.
                    ok = first == "tenant_id"
                else:
                    # An expression (the GIN indexes): its first argument must be tenant_id.
                    ok = re.match(r"^[\w.]+\(\s*tenant_id\s*[,)]", first) is not None
                if not ok:
                    bad.append(index["definition"])
        assert not bad, f"indexes not led by tenant_id: {bad}"
        # The GIN expression indexes are among those checked above.
        gin = [i["index_name"] for i in by_table["agents"] if " USING gin " in i["definition"]]
        assert sorted(gin) == ["agents_capabilities", "agents_metadata"]

        # `tenants` is keyed by the tenant id itself (`id`); besides its primary key it has only the
        # platform-wide unique name. Any other index there must be a deliberate decision.
        tenants = {i["index_name"]: i["first_key"] for i in by_table["tenants"]}
        assert tenants == {"tenants_pkey": "id", "tenants_name_key": "name"}

        extensions = {r["extname"] for r in await con.fetch("SELECT extname FROM pg_extension")}
        assert extensions == {"plpgsql"}

        assert await _agentstore_functions(con) == set(AGENTSTORE_FUNCTIONS)
        assert await con.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'agentstore_app' AND NOT rolcanlogin")
    finally:
        await con.close()


async def test_apply_rollback_apply(fresh_db: str) -> None:
    con = await asyncpg.connect(fresh_db)
    try:
        before = await _user_relations(con)
    finally:
        await con.close()
    assert before == set()

    applied = await asyncio.to_thread(migrate.apply, fresh_db, MIGRATIONS)
    assert applied == ALL
    await _check_schema(fresh_db)
    assert await asyncio.to_thread(migrate.status, fresh_db, MIGRATIONS) == [(m, True) for m in ALL]
    # Applying again is a no-op.
    assert await asyncio.to_thread(migrate.apply, fresh_db, MIGRATIONS) == []

    rolled = await asyncio.to_thread(migrate.rollback, fresh_db, MIGRATIONS, everything=True)
    assert rolled == ALL[::-1]
    con = await asyncpg.connect(fresh_db)
    try:
        assert await _user_relations(con) == set(), "rollback left agentstore relations behind"
        assert await _agentstore_functions(con) == set(), "rollback left agentstore functions behind"
        assert not await con.fetchval("SELECT count(*) FROM pg_policies WHERE schemaname = 'public'")
    finally:
        await con.close()
    assert await asyncio.to_thread(migrate.status, fresh_db, MIGRATIONS) == [(m, False) for m in ALL]

    assert await asyncio.to_thread(migrate.apply, fresh_db, MIGRATIONS) == ALL
    await _check_schema(fresh_db)


# --- the CLI ------------------------------------------------------------------------------------


def _cli_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    env.update(extra)
    return env


async def _cli(*args: str, env: dict[str, str], cwd: Path = REPO) -> tuple[int, str, str]:
    return await run_command(str(AGENTSTORE_BIN), *args, env=env, cwd=str(cwd), limit=CLI_TIMEOUT)


async def test_cli_list_apply_rollback(fresh_db: str, tmp_path: Path) -> None:
    env = _cli_env(AGENTSTORE_MIGRATIONS_DATABASE_URL=fresh_db, AGENTSTORE_MIGRATIONS_DIR=str(MIGRATIONS))

    code, out, err = await _cli("migrate", "list", env=env)
    assert (code, out.splitlines()) == (0, [f"U {m}" for m in ALL]), err

    code, out, err = await _cli("migrate", "apply", env=env)
    assert (code, out.splitlines()) == (0, [f"applied {m}" for m in ALL]), err
    await _check_schema(fresh_db)

    code, out, err = await _cli("migrate", "list", env=env)
    assert (code, out.splitlines()) == (0, [f"A {m}" for m in ALL]), err

    code, out, err = await _cli("migrate", "apply", env=env)
    assert (code, out.strip()) == (0, "nothing to apply"), err

    # One step at a time, newest first, until nothing is left.
    for migration in ALL[::-1]:
        code, out, err = await _cli("migrate", "rollback", env=env)
        assert (code, out.strip()) == (0, f"rolled back {migration}"), err
    con = await asyncpg.connect(fresh_db)
    try:
        assert await _user_relations(con) == set()
    finally:
        await con.close()

    code, out, err = await _cli("migrate", "rollback", env=env)
    assert (code, out.strip()) == (0, "nothing to roll back"), err

    # Found from the working directory when AGENTSTORE_MIGRATIONS_DIR is unset.
    code, out, err = await _cli("migrate", "apply", env=_cli_env(AGENTSTORE_MIGRATIONS_DATABASE_URL=fresh_db), cwd=REPO)
    assert (code, out.splitlines()) == (0, [f"applied {m}" for m in ALL]), err
    code, out, err = await _cli("migrate", "rollback", "--all", env=env)
    assert (code, out.splitlines()) == (0, [f"rolled back {m}" for m in ALL[::-1]]), err


async def test_cli_without_database_url_fails() -> None:
    code, _out, err = await _cli("migrate", "apply", env=_cli_env(AGENTSTORE_MIGRATIONS_DIR=str(MIGRATIONS)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "AGENTSTORE_MIGRATIONS_DATABASE_URL" in lines[0], err


async def test_cli_new_creates_a_pair_that_applies(fresh_db: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, directory)
    originals = sorted(p.name for p in directory.iterdir())
    env = _cli_env(AGENTSTORE_MIGRATIONS_DIR=str(directory), AGENTSTORE_MIGRATIONS_DATABASE_URL=fresh_db)

    code, out, err = await _cli("migrate", "new", "Add", "tasks", env=env, cwd=tmp_path)
    assert code == 0, err
    nxt, after = len(ALL) + 1, len(ALL) + 2
    forward = directory / f"{nxt:04d}_add_tasks.sql"
    backward = directory / f"{nxt:04d}_add_tasks.rollback.sql"
    assert out.split() == ["created", str(forward), "created", str(backward)]
    assert forward.is_file() and backward.is_file()
    assert sorted(p.name for p in directory.iterdir()) == sorted([*originals, forward.name, backward.name])
    assert re.search(rf"^-- depends: {ALL[-1]}$", forward.read_text(), flags=re.MULTILINE)
    assert f"{nxt:04d}_add_tasks" in backward.read_text()
    # The repository's own migrations are untouched.
    assert sorted(p.name for p in MIGRATIONS.iterdir()) == originals

    code, out, err = await _cli("migrate", "new", "more", "things", env=env, cwd=tmp_path)
    assert code == 0, err
    third = directory / f"{after:04d}_more_things.sql"
    assert re.search(rf"^-- depends: {nxt:04d}_add_tasks$", third.read_text(), flags=re.MULTILINE)
    assert (directory / f"{after:04d}_more_things.rollback.sql").is_file()

    # The scaffolds are valid migrations: yoyo applies and rolls back the whole chain.
    code, out, err = await _cli("migrate", "apply", env=env, cwd=tmp_path)
    assert code == 0, err
    chain = [*ALL, f"{nxt:04d}_add_tasks", f"{after:04d}_more_things"]
    assert out.splitlines() == [f"applied {m}" for m in chain], err
    code, out, err = await _cli("migrate", "list", env=env, cwd=tmp_path)
    assert out.splitlines() == [f"A {m}" for m in chain], err
    code, out, err = await _cli("migrate", "rollback", "--all", env=env, cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines() == [f"rolled back {m}" for m in chain[::-1]]

    # A name with nothing usable in it is refused with one line.
    code, out, err = await _cli("migrate", "new", "!!!", env=env, cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
