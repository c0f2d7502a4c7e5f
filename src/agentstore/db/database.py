"""The asyncpg pool and the unit of work: one transaction, one tenant, one time budget.

    async with db.transaction(tenant_id) as con:
        row = await con.fetchrow(GET_AGENT, tenant_id, agent_id)

Each transaction sets its tenant (and statement_timeout) with set_config(..., true), so nothing
is ever left behind on a pooled connection. `run()` wraps the same thing with the retry loop for
serialization failures and deadlocks and the mapping of database errors to API errors.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from agentstore import metrics
from agentstore.config import Settings
from agentstore.context import current_request
from agentstore.db.errors import (
    RETRYABLE,
    database_unavailable,
    deadline_exceeded,
    map_database_error,
    pool_exhausted,
)
from agentstore.errors import ApiError, StartupError

log = logging.getLogger(__name__)
T = TypeVar("T")

# The connection is gone or in an unknown state (the server terminated it, the socket broke).
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
)

# Below this much remaining deadline a statement cannot usefully start.
_MIN_STATEMENT_BUDGET = 0.001
_BACKOFF_BASE = 0.01
_BACKOFF_CAP = 0.2

# Startup refuses to serve when this says the role could bypass row-level security.
ROLE_CHECK = """
SELECT current_user AS role,
       r.rolsuper AS superuser,
       r.rolbypassrls AS bypassrls,
       EXISTS (
           SELECT 1 FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
             AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             AND n.nspname NOT LIKE 'pg_toast%'
             AND pg_has_role(current_user, c.relowner, 'USAGE')
       ) AS owns_tables,
       to_regclass('agents') IS NOT NULL AS migrated
FROM pg_roles r WHERE r.rolname = current_user
"""


def _count_statement() -> None:
    ctx = current_request()
    metrics.DB_STATEMENTS.labels(ctx.method if ctx is not None else "").inc()


class AppConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection whose release skips asyncpg's reset query.

    The server keeps no session state: tenant and statement_timeout are transaction-local, and it
    uses no LISTEN, session advisory locks or cursors outside transactions. The default reset
    (RESET ALL, UNLISTEN *, ...) would be a wasted round trip on every release; asyncpg still
    rolls back any transaction left open.
    """

    def get_reset_query(self) -> str:
        return ""

    # Every statement is counted per RPC (agentstore_db_statements_total): how many round trips
    # an RPC costs is a property the tests and operators can check without timing anything.
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109
        if not args:  # with arguments, asyncpg's execute goes through _execute
            _count_statement()
        return await super().execute(query, *args, timeout=timeout)  # type: ignore[no-any-return]

    async def _execute(self, *args: Any, **kwargs: Any) -> Any:
        _count_statement()
        return await super()._execute(*args, **kwargs)

    async def _executemany(self, *args: Any, **kwargs: Any) -> Any:
        _count_statement()
        return await super()._executemany(*args, **kwargs)


class Database:
    def __init__(self, settings: Settings, dsn: str) -> None:
        self._settings = settings
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("database pool is not open")
        return self._pool

    async def open(self) -> None:
        """Open the pool; StartupError (one line, never the password) when it cannot."""
        try:
            await self._create_pool()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise _unusable(exc, self._dsn) from None

    async def _create_pool(self) -> None:
        s = self._settings
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=min(s.db_pool_min_size, s.db_pool_max_size),
            max_size=s.db_pool_max_size,
            statement_cache_size=s.db_statement_cache_size,
            connection_class=AppConnection,
            command_timeout=s.db_statement_timeout_seconds + 1,
            server_settings={
                "application_name": "agentstore",
                # A crashed or stuck client never holds locks for long.
                "idle_in_transaction_session_timeout": "60000",
            },
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except TimeoutError:
                pool.terminate()

    async def ping(self, within: float) -> bool:
        """Whether PostgreSQL answers a trivial query within `within` seconds."""
        try:
            async with asyncio.timeout(within):
                async with self.pool.acquire() as con:
                    await con.fetchval("SELECT 1")
            return True
        except (TimeoutError, asyncpg.PostgresError, *_CONNECTION_LOST):
            return False

    async def check_role(self) -> str | None:
        """A one-line reason why this role must not serve, or None when it is safe."""
        async with self.pool.acquire(timeout=self._settings.db_pool_acquire_timeout_seconds) as con:
            row = await con.fetchrow(ROLE_CHECK)
        name = row["role"]
        if row["superuser"]:
            return f"database role {name!r} is a superuser; connect as a role that owns no table"
        if row["bypassrls"]:
            return f"database role {name!r} has BYPASSRLS; connect as a role without it"
        if row["owns_tables"]:
            return f"database role {name!r} owns tables; connect as the application role, not the owner"
        if not row["migrated"]:
            return "the database has no agentstore schema; run `agentstore migrate apply` first"
        return None

    def _left(self) -> tuple[float, bool]:
        """Seconds this unit of work may take, and whether the caller's deadline set them."""
        cap = self._settings.db_statement_timeout_seconds
        ctx = current_request()
        remaining = ctx.time_remaining() if ctx is not None else None
        if remaining is None or remaining >= cap:
            return cap, False
        return remaining, True

    def _budget(self) -> tuple[float, bool]:
        """As _left, but DEADLINE_EXCEEDED when too little is left to start a statement."""
        budget, by_deadline = self._left()
        if budget < _MIN_STATEMENT_BUDGET:
            raise deadline_exceeded()
        return budget, by_deadline

    async def _acquire(self) -> tuple[float, bool, asyncpg.Connection]:
        """The seconds this unit of work may take, whether the deadline set them, and a pooled
        connection to do it on."""
        budget, by_deadline = self._budget()
        try:
            con = await self.pool.acquire(timeout=min(budget, self._settings.db_pool_acquire_timeout_seconds))
        except TimeoutError:
            raise deadline_exceeded() if by_deadline else pool_exhausted() from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Whatever stops a new connection (refused, auth, "not accepting connections") means
            # the database cannot serve this call now.
            log.warning("database connection failed", extra={"error": type(exc).__name__})
            raise database_unavailable() from None
        return budget, by_deadline, con

    @asynccontextmanager
    async def transaction(
        self, tenant_id: uuid.UUID | None, *, readonly: bool = False, platform_scope: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        """One transaction with the tenant set for it alone; commits unless the block raises."""
        budget, _, con = await self._acquire()
        try:
            # One round trip opens the transaction and sets its context. The values are a UUID
            # and an integer produced here, never client text.
            tenant = str(tenant_id) if tenant_id is not None else ""
            await con.execute(
                ("BEGIN READ ONLY;" if readonly else "BEGIN;")
                + f" SELECT set_config('agentstore.tenant_id', '{tenant}', true),"
                f" set_config('statement_timeout', '{max(1, int(budget * 1000))}', true),"
                f" set_config('agentstore.platform_scope', '{'on' if platform_scope else ''}', true)"
            )
            yield con
            await con.execute("COMMIT")
        except (ApiError, asyncpg.PostgresError) as exc:
            # PostgreSQL answered (or the work refused to go on): the connection itself is fine.
            if isinstance(exc, asyncpg.PostgresConnectionError):
                con.terminate()
            elif not con.is_closed() and con.is_in_transaction():
                await _rollback_or_terminate(con)
            raise
        except asyncio.CancelledError:
            # asyncpg's release waits for the cancelled statement and rolls back.
            raise
        except BaseException:
            # A lost or confused connection must not go back into the pool.
            con.terminate()
            raise
        finally:
            await self.pool.release(con)

    async def read(self, query: str, *args: Any) -> list[Record]:
        """One read-only statement in its own implicit transaction: one round trip, not three.

        Only for the `agentstore_read_*` functions (migration 0005), which set the tenant inside
        the statement before they select; row-level security then applies as in `transaction`.
        The deadline is enforced client-side: on expiry asyncpg cancels the statement in PostgreSQL.
        A read shared by several callers (agentstore.flight) whose deadline moved on while it ran
        goes again with the time now left. A lost connection is retried once on a fresh one.
        """
        lost = 0
        while True:
            budget, by_deadline, con = await self._acquire()
            try:
                rows: list[Record] = await con.fetch(query, *args, timeout=budget)
                return rows
            except TimeoutError:
                if not by_deadline or self._left()[0] < _MIN_STATEMENT_BUDGET:
                    raise deadline_exceeded() from None
                log.info("repeating a shared read whose deadline moved")
            except _CONNECTION_LOST as exc:
                con.terminate()
                lost += 1
                if lost == 1:
                    log.info("retrying read after %s", type(exc).__name__)
                    continue
                raise database_unavailable() from None
            except asyncpg.PostgresError as exc:
                mapped = map_database_error(exc)
                if mapped is None:
                    raise
                raise mapped from None
            finally:
                await self.pool.release(con)

    async def run(
        self,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
        tenant_id: uuid.UUID | None,
        *,
        readonly: bool = False,
        platform_scope: bool = False,
    ) -> T:
        """Run `work` in a transaction, retrying serialization failures and deadlocks.

        Every database failure leaves as an ApiError from the one table in db.errors.
        """
        attempts = self._settings.db_max_retries + 1
        for attempt in range(attempts):
            try:
                async with self.transaction(tenant_id, readonly=readonly, platform_scope=platform_scope) as con:
                    return await work(con)
            except ApiError:
                raise
            except RETRYABLE as exc:
                if attempt + 1 >= attempts:
                    raise _mapped(exc) from None
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                ctx = current_request()
                remaining = ctx.time_remaining() if ctx is not None else None
                if remaining is not None and remaining <= delay:
                    raise _mapped(exc) from None
                log.info("retrying after %s", type(exc).__name__)
                await asyncio.sleep(delay)
            except TimeoutError:
                # asyncpg's client-side command_timeout: the cancel was already sent to PostgreSQL.
                raise deadline_exceeded() from None
            except _CONNECTION_LOST as exc:
                # A read is safe to repeat on a fresh connection; a write may have committed.
                if readonly and attempt == 0 and attempts > 1:
                    log.info("retrying read after %s", type(exc).__name__)
                    continue
                raise database_unavailable() from None
            except Exception as exc:
                mapped = map_database_error(exc)
                if mapped is None:
                    raise
                raise mapped from None
        raise AssertionError("unreachable")


async def _rollback_or_terminate(con: asyncpg.Connection) -> None:
    try:
        await con.execute("ROLLBACK")
    except Exception:
        con.terminate()


def _mapped(exc: BaseException) -> ApiError:
    mapped = map_database_error(exc)
    assert mapped is not None
    return mapped


Record = Any  # asyncpg.Record has no useful static type


def _unusable(exc: Exception, dsn: str) -> StartupError:
    """One true line (never the password) for a pool that could not open."""
    parts = urlsplit(dsn)
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    role = unquote(parts.username or "") or "(default role)"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return StartupError(f"the database at {where} refused the password of role {role!r}")
    if isinstance(exc, OSError | asyncpg.CannotConnectNowError | asyncpg.ConnectionDoesNotExistError):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return StartupError(f"cannot reach the database at {where}: {reason}", exit_code=1)
    if isinstance(exc, ValueError | asyncpg.InterfaceError):
        return StartupError("AGENTSTORE_DATABASE_URL is not a PostgreSQL URL (postgresql://user:password@host/db)")
    # PostgreSQL's own refusal (no such role or database, ...): its message names no secret.
    return StartupError(f"the database at {where} refused the connection: {exc}")
