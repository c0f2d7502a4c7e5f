"""Single-flight loads are shared work: one caller giving up must not fail the others.

The database read of a cache miss is held for real, with an ACCESS EXCLUSIVE lock on the agents
table taken by the table owner (a SELECT waits for it), so every caller that arrives meanwhile
joins the one flight. Then the first caller (the one that started the load) is cancelled, or runs
out of its deadline, and the lock is released.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
import grpc
import pytest

from agentstore.server import App
from agentstore.v1 import agent_service_pb2
from tests.conftest import ScratchDatabase
from tests.integration.helpers import create_agent
from tests.integration.test_cache import counter, get

FOLLOWERS = 10


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
async def test_a_leader_giving_up_leaves_its_followers_the_row(
    agents_stub, app: App, tenant, database: ScratchDatabase, how: str
) -> None:
    md = tenant.md()
    created = await create_agent(agents_stub, md)
    await get(agents_stub, md, created.id)  # the principal is cached: no database read for the key
    cache = app.caches["agent"]
    key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
    await cache.forget(key)
    loads = counter("agentstore_db_loads_total", kind="agent")

    con = await asyncpg.connect(database.owner_url)
    try:
        async with con.transaction():
            await con.execute("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE")
            request = agent_service_pb2.GetAgentRequest(id=created.id)
            leader = agents_stub.GetAgent(request, metadata=md, timeout=0.5 if how == "deadline" else None)
            await until(lambda: cache.waiting(key) == 1, "the leader waits on its load")
            followers = [asyncio.ensure_future(get(agents_stub, md, created.id)) for _ in range(FOLLOWERS)]
            await until(lambda: cache.waiting(key) == 1 + FOLLOWERS, "every follower joined the load")
            if how == "cancelled":
                leader.cancel()
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)) as raised:
                await leader
            if how == "deadline":
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[union-attr]
            await until(lambda: cache.waiting(key) == FOLLOWERS, "the leader left")
            # The transaction ends here: the lock goes and the one shared read goes ahead.
    finally:
        await con.close()

    results = await asyncio.gather(*followers)
    assert results == [created] * FOLLOWERS
    assert counter("agentstore_db_loads_total", kind="agent") == loads + 1
