"""`agentstore migrate`: yoyo-migrations over the SQL files in migrations/, run as the table owner."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from yoyo import get_backend, read_migrations
from yoyo.backends import DatabaseBackend
from yoyo.migrations import MigrationList

from agentstore.config import Settings


class MigrationError(Exception):
    pass


def migrations_dir(settings: Settings) -> Path:
    candidates = [settings.migrations_dir] if settings.migrations_dir else []
    candidates += [Path.cwd() / "migrations", Path(__file__).resolve().parents[2] / "migrations"]
    for candidate in candidates:
        if candidate is not None and candidate.is_dir():
            return candidate
    raise MigrationError("no migrations directory found; set AGENTSTORE_MIGRATIONS_DIR")


def owner_url(settings: Settings) -> str:
    url = settings.migrations_database_url or settings.database_url
    if not url:
        raise MigrationError("set AGENTSTORE_MIGRATIONS_DATABASE_URL (the schema owner) or AGENTSTORE_DATABASE_URL")
    return url


def _yoyo_url(url: str) -> str:
    # yoyo picks its driver from the scheme; asyncpg-style URLs use postgres:// too.
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        parts = parts._replace(scheme="postgresql")
    return urlunsplit(parts)


def _open(url: str, directory: Path) -> tuple[DatabaseBackend, MigrationList]:
    return get_backend(_yoyo_url(url)), read_migrations(str(directory))


def apply(url: str, directory: Path) -> list[str]:
    backend, migrations = _open(url, directory)
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


def rollback(url: str, directory: Path, *, everything: bool = False) -> list[str]:
    backend, migrations = _open(url, directory)
    with backend.lock():
        applied = backend.to_rollback(migrations)
        chosen = applied if everything else applied[:1]
        backend.rollback_migrations(chosen)
    return [m.id for m in chosen]


def status(url: str, directory: Path) -> list[tuple[str, bool]]:
    backend, migrations = _open(url, directory)
    applied = backend.get_applied_migration_hashes()
    return [(m.id, m.hash in applied) for m in migrations]


def new(directory: Path, name: str) -> tuple[Path, Path]:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise MigrationError("give the migration a name, e.g. `agentstore migrate new add_tasks`")
    numbers = [int(p.name[:4]) for p in directory.glob("[0-9][0-9][0-9][0-9]_*.sql")]
    number = max(numbers, default=0) + 1
    previous = sorted(p.stem for p in directory.glob("[0-9][0-9][0-9][0-9]_*.sql") if ".rollback" not in p.name)
    depends = previous[-1] if previous else ""
    forward = directory / f"{number:04d}_{slug}.sql"
    backward = directory / f"{number:04d}_{slug}.rollback.sql"
    forward.write_text(f"-- {name}\n-- depends: {depends}\n\n")
    backward.write_text(f"-- Undoes {forward.stem}.\n\n")
    return forward, backward
