"""Coalescing of concurrent point reads of one tenant into one `= ANY($2)` query.

An uncached Get costs a round-trip trio (BEGIN + set_config, SELECT, COMMIT). Reads of one tenant
that arrive in the same event-loop turn share one fetch, and while `max_inflight` fetches of a
tenant are running, new reads gather into the next batch, which starts as soon as one finishes.
So an idle server adds no delay, and a busy one answers many Gets per round trip. Each batch is
a Flight (agentstore.flight): one caller's cancellation or tight deadline never fails the batch.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agentstore.flight import Flight

T = TypeVar("T")

# Fetch the rows of these ids of this tenant: {id: value}; absent ids are not found.
FetchMany = Callable[[uuid.UUID, list[uuid.UUID]], Awaitable[dict[uuid.UUID, T]]]


@dataclass
class _Batch(Generic[T]):
    ids: set[uuid.UUID] = field(default_factory=set)
    # Set when the batch may start: at once, or when one of the tenant's running fetches ends.
    go: asyncio.Event = field(default_factory=asyncio.Event)
    flight: Flight[dict[uuid.UUID, T]] | None = None


@dataclass
class _Tenant(Generic[T]):
    running: int = 0  # batches allowed to start (go set) and not yet finished
    open: _Batch[T] | None = None  # the batch new reads join until it starts its query or fills up
    queued: deque[_Batch[T]] = field(default_factory=deque)  # full or open batches waiting for a slot


class PointReads(Generic[T]):
    def __init__(self, fetch_many: FetchMany[T], max_batch: int = 256, max_inflight: int = 2) -> None:
        self._fetch_many = fetch_many
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._tenants: dict[uuid.UUID, _Tenant[T]] = {}

    async def get(self, tenant_id: uuid.UUID, entity_id: uuid.UUID) -> T | None:
        state = self._tenants.setdefault(tenant_id, _Tenant())
        batch = state.open
        if batch is None or len(batch.ids) >= self._max_batch or not _joinable(batch):
            batch = state.open = _Batch()
            # A Flight: the batch runs in a task of its own, under the latest deadline of the
            # callers still waiting for it, and one caller giving up does not fail the others.
            batch.flight = Flight(functools.partial(self._run, tenant_id, state, batch))
            if state.running < self._max_inflight:
                self._start(state, batch)
            else:
                state.queued.append(batch)
        batch.ids.add(entity_id)
        assert batch.flight is not None
        return (await batch.flight.join()).get(entity_id)

    def _start(self, state: _Tenant[T], batch: _Batch[T]) -> None:
        state.running += 1
        batch.go.set()

    async def _run(self, tenant_id: uuid.UUID, state: _Tenant[T], batch: _Batch[T]) -> dict[uuid.UUID, T]:
        try:
            await batch.go.wait()
            # One turn of the event loop after `go`: the rest of this turn joins the batch.
            await asyncio.sleep(0)
            if state.open is batch:
                state.open = None
            return await self._fetch_many(tenant_id, list(batch.ids))
        finally:
            self._finished(tenant_id, state, batch)

    def _finished(self, tenant_id: uuid.UUID, state: _Tenant[T], batch: _Batch[T]) -> None:
        if batch.go.is_set():
            state.running -= 1
        else:  # abandoned before it could start: every caller left
            state.queued.remove(batch)
        if state.open is batch:
            state.open = None
        while state.queued and state.running < self._max_inflight:
            self._start(state, state.queued.popleft())
        if not state.running and not state.queued and state.open is None and self._tenants.get(tenant_id) is state:
            del self._tenants[tenant_id]


def _joinable(batch: _Batch[T]) -> bool:
    return batch.flight is not None and batch.flight.joinable
