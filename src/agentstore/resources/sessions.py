"""Sessions: SQL, row → proto, the SessionService servicer, and the purge of expired rows.

A session is gone from the instant its expire_time passes: every statement checks
`expire_time > now()`, so the purge only reclaims space and never decides visibility. Sessions read
through L1 → L2 (key `<prefix>c:session:<tenant>:<id>`) → PostgreSQL like every cached kind; each
cached copy ends at its session's expire_time (EntityCache's `expires`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from agentstore.cache.entity import EntityCache
from agentstore.context import current_principal
from agentstore.db import ConstraintReason, Database, Record, register_constraint
from agentstore.deps import Add, Deps, Resource
from agentstore.errors import ApiError, invalid_argument, invalid_field, not_found
from agentstore.jobs import all_tenant_ids
from agentstore.query import FieldKind
from agentstore.query.filter import FilterError, compile_filter
from agentstore.query.listing import ID_KEY, ListSpec, filter_fields, sort_keys
from agentstore.resources.agents import agent_cache
from agentstore.resources.fields import check_text, etag_of, json_to_struct, parse_id, struct_to_json, to_timestamp
from agentstore.resources.paging import Pages
from agentstore.resources.spec import Create, ResourceSpec, Update, delete, entity_cache, run
from agentstore.v1 import session_pb2, session_service_pb2, session_service_pb2_grpc

log = logging.getLogger(__name__)

ENTITY = "session"

DEFAULT_TTL = timedelta(hours=1)
MIN_TTL = timedelta(seconds=1)
MAX_TTL = timedelta(days=30)
MAX_USER_ID = 256
# Rows deleted per statement by the purge, so it never holds many row locks at once.
PURGE_BATCH = 1000
# The periodic purge leaves rows this long past their expiry (they are invisible already), so it
# never races the instant of expiry and an expired session can still be inspected for a while.
PURGE_GRACE = timedelta(minutes=1)

COLUMNS_OF = """{a}id, {a}agent_id, {a}user_id, {a}state::text AS state, {a}ttl, {a}expire_time, {a}create_time,
       {a}update_time, {a}version"""
COLUMNS = COLUMNS_OF.format(a="")
# Every read and write sees only live sessions: expiry is exact, not up to the purge.
LIVE = "AND expire_time > now()"

# The purge sees all tenants only through the platform scope of the tenants table; sessions
# themselves are deleted one tenant (one row-level-security scope) at a time.
PURGE_EXPIRED = """
WITH gone AS (
    DELETE FROM sessions
    WHERE tenant_id = $1 AND id IN (
        SELECT id FROM sessions
        WHERE tenant_id = $1 AND expire_time <= now() - $2::interval
        ORDER BY expire_time
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    )
    RETURNING 1
)
SELECT count(*) FROM gone
"""

FILTER_FIELDS = filter_fields(
    agent_id=FieldKind.UUID,
    user_id=FieldKind.STRING,
    state=FieldKind.JSON,
    create_time=FieldKind.TIMESTAMP,
    update_time=FieldKind.TIMESTAMP,
    expire_time=FieldKind.TIMESTAMP,
)
LIST_SPEC = ListSpec(
    resource="sessions",
    select=f"SELECT {COLUMNS} FROM sessions WHERE tenant_id = $1 {LIVE}",
    fields=FILTER_FIELDS,
    sort_keys=sort_keys(
        create_time=FieldKind.TIMESTAMP, update_time=FieldKind.TIMESTAMP, expire_time=FieldKind.TIMESTAMP
    ),
    default_order="create_time",
    tie_breaker=ID_KEY,
)

UPDATABLE = ("user_id", "state", "ttl")
OUTPUT_ONLY = ("id", "expire_time", "create_time", "update_time", "etag")
IMMUTABLE = ("agent_id",)
STATE_KEY_PREFIX = "state."

register_constraint(
    "sessions_agent_fkey",
    ConstraintReason(
        grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND", "the tenant has no agent with this id", "session.agent_id"
    ),
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def epoch_micros(moment: datetime) -> int:
    """Exact microseconds since the Unix epoch (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def session_from_row(row: Record) -> session_pb2.Session:
    session = session_pb2.Session(
        id=str(row["id"]),
        agent_id=str(row["agent_id"]),
        user_id=row["user_id"],
        etag=etag_of(row["version"]),
    )
    json_to_struct(row["state"], session.state)
    session.ttl.FromTimedelta(row["ttl"])
    to_timestamp(row["expire_time"], session.expire_time)
    to_timestamp(row["create_time"], session.create_time)
    to_timestamp(row["update_time"], session.update_time)
    return session


def session_not_found(session_id: uuid.UUID | str) -> ApiError:
    return not_found("SESSION_NOT_FOUND", f"no session {session_id}, or it has expired")


def ttl_of(duration: duration_pb2.Duration, field: str) -> timedelta:
    """A client's ttl, checked against 1 s .. 30 days (sub-microsecond digits are dropped)."""
    # Negative parts are either invalid or below the minimum; the seconds are bounded before any
    # timedelta is made of them (one of 10^14 s would overflow).
    if not 0 <= duration.seconds <= MAX_TTL.total_seconds() or not 0 <= duration.nanos <= 999_999_999:
        raise invalid_field(field, "must be from 1 second to 30 days")
    ttl = timedelta(seconds=duration.seconds, microseconds=duration.nanos // 1000)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise invalid_field(field, "must be from 1 second to 30 days")
    return ttl


def validate(session: session_pb2.Session, paths: Sequence[str], creating: bool) -> None:
    """Check the fields named in `paths` (every writable one for a create): before any transaction."""
    if creating:
        if not session.agent_id:
            raise invalid_field("session.agent_id", "is required")
        parse_id(session.agent_id, "session.agent_id")
    elif "state" in paths and any(p.startswith(STATE_KEY_PREFIX) for p in paths):
        raise invalid_argument(
            "INVALID_UPDATE_MASK",
            "state and state.<key> paths cannot be combined",
            [("update_mask", "state and state.<key> paths cannot be combined")],
        )
    if "user_id" in paths:
        check_text(session.user_id, "session.user_id", max_len=MAX_USER_ID)
    if "state" in paths:
        struct_to_json(session.state, "session.state")
    keys = [path[len(STATE_KEY_PREFIX) :] for path in paths if path.startswith(STATE_KEY_PREFIX)]
    if keys:
        # The values the state.<key> paths write; the size of the whole merged state is known only
        # once the stored one is read (column_values checks it then).
        patch = session_pb2.Session()
        for key in keys:
            if key in session.state.fields:
                patch.state.fields[key].CopyFrom(session.state.fields[key])
        struct_to_json(patch.state, "session.state")
    if "ttl" in paths and session.HasField("ttl"):
        ttl_of(session.ttl, "session.ttl")


def column_values(session: session_pb2.Session) -> list[Any]:
    """The stored form of the writable fields (validated already), in the order UPDATE takes them."""
    ttl = ttl_of(session.ttl, "session.ttl") if session.HasField("ttl") else DEFAULT_TTL
    return [session.user_id, struct_to_json(session.state, "session.state"), ttl]


def merge_for_update(
    stored: session_pb2.Session, patch: session_pb2.Session, paths: Sequence[str]
) -> session_pb2.Session:
    merged = session_pb2.Session()
    merged.CopyFrom(stored)
    for path in paths:
        if path == "user_id":
            merged.user_id = patch.user_id
        elif path == "state":
            merged.state.CopyFrom(patch.state)
        elif path == "ttl":
            # Named in the mask but unset: back to the default.
            merged.ClearField("ttl")
            if patch.HasField("ttl"):
                merged.ttl.CopyFrom(patch.ttl)
        else:
            key = path[len(STATE_KEY_PREFIX) :]
            if key in patch.state.fields:
                merged.state.fields[key].CopyFrom(patch.state.fields[key])
            elif key in merged.state.fields:
                del merged.state.fields[key]
    return merged


def with_agent(filter: str, agent_id: uuid.UUID | None) -> str:
    """The request's filter, narrowed to one agent. The client's filter is parsed on its own
    first, so it cannot reach outside its parentheses (e.g. `x) OR (y`)."""
    if agent_id is None:
        return filter
    try:
        compile_filter(filter, FILTER_FIELDS, first_param=2)
    except FilterError as exc:
        raise invalid_argument("INVALID_FILTER", str(exc), [("filter", str(exc))]) from None
    narrowed = f'agent_id = "{agent_id}"'
    return f"{narrowed} AND ({filter})" if filter.strip() else narrowed


def session_expiry(payload: bytes) -> int:
    """When cached Session bytes stop being valid, in Unix µs; bytes this server did not write: now."""
    session = _decoded(payload)
    return _micros(session.expire_time) if session is not None else 0


def _decoded(payload: bytes) -> session_pb2.Session | None:
    try:
        return session_pb2.Session.FromString(payload)
    except DecodeError:
        return None  # not something this server wrote: ask PostgreSQL


def _micros(moment: timestamp_pb2.Timestamp) -> int:
    return moment.seconds * 1_000_000 + moment.nanos // 1000


def _expired(session: session_pb2.Session) -> bool:
    return _micros(session.expire_time) <= time.time_ns() // 1000


SESSION = ResourceSpec(
    entity=ENTITY,
    table="sessions",
    columns_of=COLUMNS_OF,
    from_row=session_from_row,
    not_found=session_not_found,
    read_function="agentstore_read_sessions",
    json_function="agentstore_session_json",
    validate=validate,
    insert_columns="agent_id, user_id, state, ttl, expire_time",
    insert_values="$3, $4, $5::jsonb, $6::interval, now() + $6::interval",
    create_values=lambda session: [uuid.UUID(session.agent_id), *column_values(session)],
    # An update extends the session's life by its (possibly new) ttl, counted from now.
    update_set="user_id = $3, state = $4::jsonb, ttl = $5::interval, expire_time = now() + $5::interval",
    update_values=column_values,
    creatable=("agent_id", *UPDATABLE),
    updatable=UPDATABLE,
    output_only=OUTPUT_ONLY,
    immutable=IMMUTABLE,
    key_prefixes=(STATE_KEY_PREFIX,),
    live=LIVE,
    merge=merge_for_update,  # type: ignore[arg-type]
    row_expires=lambda row: epoch_micros(row["expire_time"]),
    expires=session_expiry,
)


def session_cache(deps: Deps) -> EntityCache:
    return entity_cache(deps, SESSION)


class SessionService(session_service_pb2_grpc.SessionServiceServicer):
    """Servicers only unpack the request, run one unit of work and build the response."""

    def __init__(self, db: Database, pages: Pages, cache: EntityCache, agents: EntityCache) -> None:
        self._db = db
        self._pages = pages
        self._cache = cache
        self._agents = agents

    # Reads and writes answer wire bytes (cached, or the one encoding of a written row).
    async def GetSession(  # type: ignore[override]
        self, request: session_service_pb2.GetSessionRequest, context: Any
    ) -> bytes:
        tenant = current_principal().tenant_id
        session_id = parse_id(request.id)
        payload = await self._cache.get((tenant, session_id))
        if payload is None:
            raise session_not_found(session_id)
        session = _decoded(payload)
        # The cache already treats an expired copy as a miss; this also catches a row that
        # expired on its way here, so NOT_FOUND holds from the very microsecond of expiry.
        if session is None or _expired(session):
            raise session_not_found(session_id)
        # A cached copy may outlive its agent: DeleteAgent cascades to sessions in PostgreSQL only,
        # and invalidates the agent (through the agent cache) in every process before it returns.
        if await self._agents.get((tenant, uuid.UUID(session.agent_id))) is None:
            raise session_not_found(session_id)
        return payload

    async def ListSessions(
        self, request: session_service_pb2.ListSessionsRequest, context: Any
    ) -> session_service_pb2.ListSessionsResponse:
        tenant = current_principal().tenant_id
        agent_id = parse_id(request.agent_id, "agent_id") if request.agent_id else None
        items, next_token = await self._pages.fetch(
            LIST_SPEC, tenant, request, session_from_row, filter=with_agent(request.filter, agent_id)
        )
        return session_service_pb2.ListSessionsResponse(sessions=items, next_page_token=next_token)

    async def CreateSession(  # type: ignore[override]
        self, request: session_service_pb2.CreateSessionRequest, context: Any
    ) -> bytes:
        return await run(self._db, self._cache, current_principal(), Create.of(SESSION, request, "deleted or expired"))

    async def UpdateSession(  # type: ignore[override]
        self, request: session_service_pb2.UpdateSessionRequest, context: Any
    ) -> bytes:
        return await run(self._db, self._cache, current_principal(), Update.of(SESSION, request))

    async def DeleteSession(self, request: session_service_pb2.DeleteSessionRequest, context: Any) -> empty_pb2.Empty:
        principal = current_principal()
        session_id = parse_id(request.id)
        tenant = principal.tenant_id
        row = await self._db.run(lambda con: delete(con, SESSION, principal, session_id, request.etag), tenant)
        # The tombstone stays until the session would have expired.
        await self._cache.deleted((tenant, session_id), row["version"], expires_us=epoch_micros(row["expire_time"]))
        return empty_pb2.Empty()

    # --- the purge of expired rows ----------------------------------------------------------

    async def purge_expired(self, grace: timedelta = timedelta(0)) -> int:
        """Delete the sessions of every tenant that expired more than `grace` ago; the count.

        Expired sessions are already invisible, so this only reclaims space. Each tenant is its
        own transaction per batch: row-level security shows one tenant at a time.
        """
        total = 0
        for tenant in await all_tenant_ids(self._db):
            while True:
                deleted = await self._purge_batch(tenant, grace)
                total += deleted
                if deleted < PURGE_BATCH:
                    break
        return total

    async def _purge_batch(self, tenant: uuid.UUID, grace: timedelta) -> int:
        deleted: int = await self._db.run(lambda con: con.fetchval(PURGE_EXPIRED, tenant, grace, PURGE_BATCH), tenant)
        return deleted


def register(add: Add, deps: Deps) -> None:
    service = SessionService(deps.db, deps.pages, deps.shared(session_cache), deps.shared(agent_cache))
    add(session_service_pb2_grpc.add_SessionServiceServicer_to_server, service)
    deps.add_job(
        "expired sessions purged",
        deps.settings.session_purge_interval_seconds,
        lambda: service.purge_expired(PURGE_GRACE),
    )


RESOURCE = Resource.of(session_service_pb2, "SessionService", register)
