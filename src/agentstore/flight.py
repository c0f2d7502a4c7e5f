"""One piece of work shared by every caller that joins it (a cache fill, a coalesced read).

The work runs in a task of its own, never in the first caller's: a caller that is cancelled, or
whose deadline passes, gives up its own wait and nothing else. The work runs under the latest
deadline of the callers still waiting (none if one of them has none; the database caps every
statement at AGENTSTORE_DB_STATEMENT_TIMEOUT_SECONDS anyway), and is cancelled only when no
caller is left to want its result. Flights nest: a flight that joins another (a cache fill that
joins a coalesced read) lends it the deadlines of its own callers.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from agentstore.context import RequestContext, current_request, set_current_request

T = TypeVar("T")


class _SharedContext(RequestContext):
    """The work's request context: the first caller's identity (its request id and method label
    what the work logs and counts), and the latest deadline of the callers still waiting."""

    __slots__ = ("joiners",)

    def __init__(self, first: RequestContext | None) -> None:
        if first is None:
            super().__init__(request_id="")
        else:
            super().__init__(
                request_id=first.request_id, principal=first.principal, no_cache=first.no_cache, method=first.method
            )
        self.joiners: list[RequestContext | None] = []

    def time_remaining(self) -> float | None:
        latest: float | None = None
        for ctx in self.joiners:
            remaining = ctx.time_remaining() if ctx is not None else None
            if remaining is None:
                return None
            if latest is None or remaining > latest:
                latest = remaining
        return latest


class Flight(Generic[T]):
    def __init__(self, work: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._ctx = _SharedContext(current_request())
        context = contextvars.copy_context()
        context.run(set_current_request, self._ctx)
        self._task: asyncio.Task[T] = asyncio.get_running_loop().create_task(work(), context=context)
        self._task.add_done_callback(_retrieve)

    @property
    def waiting(self) -> int:
        """How many callers are waiting for the result."""
        return len(self._ctx.joiners)

    @property
    def joinable(self) -> bool:
        """False once the work finished or was cancelled (every caller left): start another."""
        return not self._task.done() and not self._task.cancelling()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        self._task.add_done_callback(lambda _: callback())

    async def join(self) -> T:
        """The work's result (or its exception), waited for under this caller's cancellation only."""
        ctx = current_request()
        joiners = self._ctx.joiners
        joiners.append(ctx)
        try:
            return await asyncio.shield(self._task)
        finally:
            del joiners[next(i for i, c in enumerate(joiners) if c is ctx)]
            if not joiners and not self._task.done():
                self._task.cancel()  # nobody is left to want it


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Every waiter got the exception already; nobody else must log it as never retrieved.
    if not task.cancelled():
        task.exception()
