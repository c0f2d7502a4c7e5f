"""Coalescing of concurrent point reads of one tenant into one `= ANY($2)` query.

An uncached Get costs a round-trip trio (BEGIN + set_config, SELECT, COMMIT). Reads of one tenant
that arrive in the same event-loop turn share one fetch, and while `max_inflight` fetches of a
tenant are running, new reads gather into the next batch, which starts as soon as one finishes.
So an idle server adds no delay, and a busy one answers many Gets per round trip.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Fetch the rows of these ids of this tenant: {id: value}; absent ids are not found.
FetchMany = Callable[[uuid.UUID, list[uuid.UUID]], Awaitable[dict[uuid.UUID, T]]]


@dataclass
class _Batch(Generic[T]):
    futures: dict[uuid.UUID, asyncio.Future[T | None]] = field(default_factory=dict)
    scheduled: bool = False


@dataclass
class _Tenant(Generic[T]):
    running: int = 0  # fetches started or scheduled
    pending: _Batch[T] | None = None


class PointReads(Generic[T]):
    def __init__(self, fetch_many: FetchMany[T], max_batch: int = 256, max_inflight: int = 2) -> None:
        self._fetch_many = fetch_many
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._tenants: dict[uuid.UUID, _Tenant[T]] = {}

    async def get(self, tenant_id: uuid.UUID, entity_id: uuid.UUID) -> T | None:
        state = self._tenants.setdefault(tenant_id, _Tenant())
        batch = state.pending
        if batch is None or len(batch.futures) >= self._max_batch:
            batch = state.pending = _Batch()
        future = batch.futures.get(entity_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            batch.futures[entity_id] = future
        if not batch.scheduled and state.running < self._max_inflight:
            self._schedule(tenant_id, state, batch)
        return await asyncio.shield(future)

    def _schedule(self, tenant_id: uuid.UUID, state: _Tenant[T], batch: _Batch[T]) -> None:
        batch.scheduled = True
        state.running += 1
        # call_soon lets the rest of this turn join; the flush runs in this caller's context,
        # so its deadline bounds the shared query.
        asyncio.get_running_loop().call_soon(self._start, tenant_id, state, batch)

    def _start(self, tenant_id: uuid.UUID, state: _Tenant[T], batch: _Batch[T]) -> None:
        if state.pending is batch:
            state.pending = None
        task = asyncio.get_running_loop().create_task(self._flush(tenant_id, batch))
        task.add_done_callback(lambda t: self._finished(t, tenant_id, state))

    def _finished(self, task: asyncio.Task[None], tenant_id: uuid.UUID, state: _Tenant[T]) -> None:
        if not task.cancelled():
            task.exception()  # delivered to every waiter already
        state.running -= 1
        if state.pending is not None and not state.pending.scheduled:
            self._schedule(tenant_id, state, state.pending)
        elif state.running == 0 and state.pending is None and self._tenants.get(tenant_id) is state:
            del self._tenants[tenant_id]

    async def _flush(self, tenant_id: uuid.UUID, batch: _Batch[T]) -> None:
        try:
            found = await self._fetch_many(tenant_id, list(batch.futures))
        except BaseException as exc:
            for future in batch.futures.values():
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved by the awaiting callers; never logged as lost
            raise
        for entity_id, future in batch.futures.items():
            if not future.done():
                future.set_result(found.get(entity_id))
