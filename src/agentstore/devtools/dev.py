"""`agentstore dev`: everything on one laptop with no configuration at all.

Without URLs it starts the embedded PostgreSQL and Redis under AGENTSTORE_DEV_DATA_DIR
(default ./.agentstore), applies the migrations as the owner, creates the application role, a
demo tenant and an API key, prints copy-paste grpcurl commands and serves on 127.0.0.1:50051.
Ctrl-C stops everything it started; the next run reuses the data and the printed key.

With AGENTSTORE_MIGRATIONS_DATABASE_URL (or AGENTSTORE_DATABASE_URL) set, that URL must be able
to create roles: dev migrates with it and serves as the derived role `agentstore_server`.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path
from typing import Protocol

import asyncpg

from agentstore import migrate
from agentstore.auth import Authenticator
from agentstore.bootstrap import find_tenant, new_admin_key
from agentstore.config import Settings
from agentstore.dsn import replace_dsn
from agentstore.errors import ApiError, StartupError
from agentstore.resources.tenants import create_tenant
from agentstore.server import serve_until_signalled, start_server

DEV_DATABASE = "agentstore"
DEV_ROLE = "agentstore_server"
DEV_ROLE_PASSWORD = "agentstore-dev"
DEV_LISTEN = "127.0.0.1:50051"
DEMO_TENANT = "demo"


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def _write_secret(path: Path, value: str) -> None:
    path.touch(mode=0o600)
    path.write_text(value + "\n")


def _secret_file(path: Path, make: bool = True) -> str | None:
    if path.exists():
        return path.read_text().strip() or None
    if not make:
        return None
    value = secrets.token_urlsafe(24)
    _write_secret(path, value)
    return value


async def _ensure_database(admin_url: str) -> str:
    con = await asyncpg.connect(admin_url)
    try:
        if not await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DEV_DATABASE):
            await con.execute(f'CREATE DATABASE "{DEV_DATABASE}"')
    finally:
        await con.close()
    return replace_dsn(admin_url, database=DEV_DATABASE)


async def _ensure_app_role(owner_url: str) -> str:
    con = await asyncpg.connect(owner_url)
    try:
        if not await con.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DEV_ROLE):
            await con.execute(f"CREATE ROLE {DEV_ROLE} LOGIN PASSWORD '{DEV_ROLE_PASSWORD}'")
        await con.execute(f"GRANT agentstore_app TO {DEV_ROLE}")
    finally:
        await con.close()
    return replace_dsn(owner_url, user=DEV_ROLE, password=DEV_ROLE_PASSWORD)


def _banner(address: str, key: str, platform_token: str) -> str:
    key_header = f'-H "authorization: Bearer {key}"'
    agent = (
        '{"agent": {"name": "planner-1", "role": "planner", "capabilities": ["python"], "metadata": {"region": "eu"}}}'
    )
    return f"""
agentstore dev is serving on {address}

  demo tenant API key (admin):  {key}
  platform admin token:         {platform_token}

Try it (grpcurl):
  grpcurl -plaintext {address} list
  grpcurl -plaintext {address} describe agentstore.v1.AgentService
  grpcurl -plaintext {key_header} \\
    -d '{agent}' \\
    {address} agentstore.v1.AgentService/CreateAgent
  grpcurl -plaintext {key_header} \\
    -d '{{"filter": "capabilities:\\"python\\" AND metadata.region = \\"eu\\"", "order_by": "name"}}' \\
    {address} agentstore.v1.AgentService/ListAgents
  grpcurl -plaintext {address} grpc.health.v1.Health/Check

Ctrl-C stops the server and the embedded databases; the next run reuses the data and this key.
"""


async def _demo_key(settings: Settings, app_db_url: str, saved: str | None) -> str:
    """The saved demo key while it still works, else a new admin key of the demo tenant."""
    from agentstore.db import Database

    db = Database(settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1}), app_db_url)
    await db.open()
    try:
        if saved is not None:
            try:
                await Authenticator(db, settings).authenticate(f"Bearer {saved}")
                return saved
            except ApiError:
                pass  # revoked, expired or from another database: make a new one
        tenant = await find_tenant(db, DEMO_TENANT)
        if tenant is None:
            from agentstore.auth import PLATFORM_PRINCIPAL

            tenant = await create_tenant(db, PLATFORM_PRINCIPAL, DEMO_TENANT)
        return await new_admin_key(db, tenant, "agentstore dev")
    finally:
        await db.close()


def run_dev(settings: Settings) -> int:
    data_dir = settings.dev_data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    started: list[_Stoppable] = []
    try:
        admin_url = settings.migrations_database_url or settings.database_url
        if admin_url is None:
            from agentstore.devtools.embedded import EmbeddedPostgres

            pg = EmbeddedPostgres(data_dir / "postgres", require_password=True)
            print("starting embedded PostgreSQL ...", file=sys.stderr)
            admin_url = asyncio.run(_ensure_database(pg.start()))
            started.append(pg)
        redis_url = settings.redis_url
        if redis_url is None:
            from agentstore.devtools.embedded import EmbeddedRedis

            rd = EmbeddedRedis(data_dir / "redis")
            print("starting embedded Redis ...", file=sys.stderr)
            redis_url = rd.start()
            started.append(rd)
        applied = migrate.apply(admin_url, migrate.migrations_dir(settings))
        if applied:
            print(f"applied migrations: {', '.join(applied)}", file=sys.stderr)
        app_url = asyncio.run(_ensure_app_role(admin_url))
        token = (
            settings.platform_admin_token.get_secret_value()
            if settings.platform_admin_token
            else _secret_file(data_dir / "platform-admin-token")
        )
        listen = settings.listen_address if "listen_address" in settings.model_fields_set else DEV_LISTEN
        page_secret = (
            settings.page_token_secret.get_secret_value()
            if settings.page_token_secret
            else _secret_file(data_dir / "page-token-secret")
        )
        serving = Settings(
            **{
                **settings.model_dump(),
                "listen_address": listen,
                "platform_admin_token": token,
                "page_token_secret": page_secret,
            }
        )
        key_file = data_dir / "demo-api-key"
        saved = _secret_file(key_file, make=False)
        key = asyncio.run(_demo_key(serving, app_url, saved))
        if key != saved:
            _write_secret(key_file, key)

        async def main() -> None:
            app = await start_server(serving, app_url, redis_url or "")
            print(_banner(listen, key, str(token)), flush=True)
            await serve_until_signalled(app)

        asyncio.run(main())
        return 0
    except (StartupError, migrate.MigrationError, RuntimeError) as exc:
        print(f"agentstore: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        for server in reversed(started):
            server.stop()
