"""PointReads: concurrent point reads of one tenant share one fetch (pure logic, fake fetch)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from agentstore.context import RequestContext, current_request, set_current_request
from agentstore.db.coalesce import PointReads


class FakeFetch:
    def __init__(self, rows: dict[uuid.UUID, str], fail: bool = False) -> None:
        self.rows = rows
        self.calls: list[tuple[uuid.UUID, list[uuid.UUID]]] = []
        self.fail = fail

    async def __call__(self, tenant: uuid.UUID, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        self.calls.append((tenant, ids))
        await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("database down")
        return {i: self.rows[i] for i in ids if i in self.rows}


async def test_same_turn_reads_of_one_tenant_share_one_fetch() -> None:
    ids = [uuid.uuid4() for _ in range(20)]
    fetch = FakeFetch({i: str(i) for i in ids[:15]})
    reads = PointReads(fetch)
    tenant = uuid.uuid4()
    results = await asyncio.gather(*(reads.get(tenant, i) for i in [*ids, ids[0]]))
    assert results == [str(i) if n < 15 else None for n, i in enumerate(ids)] + [str(ids[0])]
    assert len(fetch.calls) == 1
    assert sorted(fetch.calls[0][1]) == sorted(ids)  # the duplicate was asked once


async def test_tenants_never_share_a_fetch() -> None:
    fetch = FakeFetch({})
    reads = PointReads(fetch)
    a, b = uuid.uuid4(), uuid.uuid4()
    await asyncio.gather(reads.get(a, uuid.uuid4()), reads.get(b, uuid.uuid4()), reads.get(a, uuid.uuid4()))
    assert sorted(len(ids) for _, ids in fetch.calls) == [1, 2]
    assert {tenant for tenant, _ in fetch.calls} == {a, b}


async def test_batches_are_bounded() -> None:
    fetch = FakeFetch({})
    reads = PointReads(fetch, max_batch=8)
    await asyncio.gather(*(reads.get(uuid.UUID(int=1), uuid.uuid4()) for _ in range(20)))
    assert [len(ids) for _, ids in fetch.calls] == [8, 8, 4]


async def test_a_failed_fetch_fails_every_waiter_and_the_next_turn_starts_fresh() -> None:
    fetch = FakeFetch({}, fail=True)
    reads = PointReads(fetch)
    tenant = uuid.uuid4()
    results = await asyncio.gather(*(reads.get(tenant, uuid.uuid4()) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    fetch.fail = False
    assert await reads.get(tenant, uuid.uuid4()) is None
    assert len(fetch.calls) == 2


async def test_a_cancelled_waiter_does_not_cancel_the_others() -> None:
    key = uuid.uuid4()
    fetch = FakeFetch({key: "row"})
    reads = PointReads(fetch)
    tenant = uuid.uuid4()
    first = asyncio.ensure_future(reads.get(tenant, key))
    second = asyncio.ensure_future(reads.get(tenant, key))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == "row"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_reads_arriving_during_a_fetch_gather_into_the_next_batch() -> None:
    release = asyncio.Event()
    calls: list[list[uuid.UUID]] = []

    async def slow_fetch(tenant: uuid.UUID, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        calls.append(ids)
        await release.wait()
        return {}

    reads = PointReads(slow_fetch, max_inflight=1)
    tenant = uuid.uuid4()
    first = asyncio.ensure_future(reads.get(tenant, uuid.uuid4()))
    await asyncio.sleep(0.01)  # the first fetch is running
    later = [asyncio.ensure_future(reads.get(tenant, uuid.uuid4())) for _ in range(10)]
    for _ in range(10):  # spread over several loop turns
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *later)
    assert [len(ids) for ids in calls] == [1, 10]


async def test_full_batches_waiting_for_a_slot_all_run() -> None:
    """Batches that fill up while the tenant's fetch slots are busy queue up; none is forgotten."""
    fetch = FakeFetch({})
    reads = PointReads(fetch, max_batch=2, max_inflight=1)
    tenant = uuid.uuid4()
    results = await asyncio.wait_for(asyncio.gather(*(reads.get(tenant, uuid.uuid4()) for _ in range(7))), 2)
    assert results == [None] * 7
    assert [len(ids) for _, ids in fetch.calls] == [2, 2, 2, 1]


async def test_the_batch_runs_under_the_latest_deadline_of_its_waiters() -> None:
    """The first caller's tight deadline neither bounds nor fails the shared fetch."""
    key = uuid.uuid4()
    release = asyncio.Event()
    seen: list[float | None] = []

    async def slow_fetch(tenant: uuid.UUID, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
        await release.wait()
        ctx = current_request()
        seen.append(ctx.time_remaining() if ctx is not None else -1.0)
        return {key: "row"}

    reads = PointReads(slow_fetch)
    tenant = uuid.uuid4()

    async def read(deadline_in: float | None) -> str | None:
        deadline = time.monotonic() + deadline_in if deadline_in is not None else None
        set_current_request(RequestContext(request_id="r", deadline=deadline))
        async with asyncio.timeout(deadline_in):
            return await reads.get(tenant, key)

    tight = asyncio.ensure_future(read(0.05))
    await asyncio.sleep(0)  # the tight caller starts the batch
    relaxed = asyncio.ensure_future(read(None))
    with pytest.raises(TimeoutError):
        await tight
    release.set()
    assert await relaxed == "row"
    assert seen == [None]  # the caller still waiting has no deadline
