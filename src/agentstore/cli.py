"""`agentstore serve | dev | migrate | tenants`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

# The server never forks while serving; `agentstore dev` only runs pg_ctl. Without this, gRPC
# prints a warning about its fork handlers each time. Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from agentstore import migrate
from agentstore.config import Settings, load_settings
from agentstore.logs import configure_logging


def _fail(message: str, code: int = 2) -> int:
    print(f"agentstore: {message}", file=sys.stderr)
    return code


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from agentstore.errors import StartupError
    from agentstore.server import serve_until_signalled, start_server

    missing = [
        name
        for name, value in (
            ("AGENTSTORE_DATABASE_URL", settings.database_url),
            ("AGENTSTORE_REDIS_URL", settings.redis_url),
        )
        if not value
    ]
    if missing:
        return _fail(f"{' and '.join(missing)} must be set for `agentstore serve` (or use `agentstore dev`)")
    assert settings.database_url and settings.redis_url

    async def main() -> None:
        app = await start_server(settings, settings.database_url or "", settings.redis_url or "")
        await serve_until_signalled(app)

    try:
        _run(main())
    except StartupError as exc:
        return _fail(str(exc), exc.exit_code)
    return 0


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    try:
        from agentstore.devtools.dev import run_dev
    except ImportError:
        return _fail("`agentstore dev` needs a checkout of the repository with the dev extra (`make run`)")
    return run_dev(settings)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    try:
        directory = migrate.migrations_dir(settings)
        if args.action == "new":
            forward, backward = migrate.new(directory, " ".join(args.name))
            print(f"created {forward}\ncreated {backward}")
            return 0
        url = migrate.owner_url(settings)
        if args.action == "apply":
            applied = migrate.apply(url, directory)
            print("\n".join(f"applied {m}" for m in applied) or "nothing to apply")
        elif args.action == "rollback":
            rolled = migrate.rollback(url, directory, everything=args.all)
            print("\n".join(f"rolled back {m}" for m in rolled) or "nothing to roll back")
        else:
            for migration_id, applied_flag in migrate.status(url, directory):
                print(f"{'A' if applied_flag else 'U'} {migration_id}")
    except migrate.MigrationError as exc:
        return _fail(str(exc))
    return 0


def cmd_tenants(settings: Settings, args: argparse.Namespace) -> int:
    from agentstore.bootstrap import bootstrap_tenant

    if not settings.database_url:
        return _fail("AGENTSTORE_DATABASE_URL must be set")
    tenant, key = asyncio.run(bootstrap_tenant(settings, settings.database_url, args.name))
    print(f"tenant  {tenant.id}  {tenant.name}")
    print(f"api key {key}")
    print("(the key is shown only once; it is an admin key of this tenant)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentstore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve gRPC in production (needs AGENTSTORE_DATABASE_URL and _REDIS_URL)")
    sub.add_parser("dev", help="serve on 127.0.0.1:50051 with embedded PostgreSQL and Redis; no config needed")
    m = sub.add_parser("migrate", help="apply, roll back, list or create migrations (as the schema owner)")
    m_sub = m.add_subparsers(dest="action", required=True)
    m_sub.add_parser("apply", help="apply every pending migration")
    rb = m_sub.add_parser("rollback", help="roll back the latest migration")
    rb.add_argument("--all", action="store_true", help="roll back every applied migration")
    m_sub.add_parser("list", help="list migrations: A applied, U unapplied")
    new = m_sub.add_parser("new", help="create NNNN_name.sql and its rollback")
    new.add_argument("name", nargs="+")
    # Listed for --help only: main() answers `bench ...` before parsing.
    sub.add_parser("bench", help="moved: run `make bench` in a checkout (bench/README.md)")
    t = sub.add_parser("tenants", help="bootstrap tenants")
    t_sub = t.add_subparsers(dest="action", required=True)
    create = t_sub.add_parser("create", help="create a tenant and print its first admin API key")
    create.add_argument("name")
    return parser


COMMANDS = {"serve": cmd_serve, "dev": cmd_dev, "migrate": cmd_migrate, "tenants": cmd_tenants}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The harness is not part of the package: it lives in bench/ of a checkout, with its own venv.
        return _fail("the benchmark needs a checkout of the repository: run `make bench` there (bench/README.md)")
    args = build_parser().parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log_level)
    return COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
