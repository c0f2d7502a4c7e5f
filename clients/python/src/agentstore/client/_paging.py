"""Page iterators for every List (and Search) RPC: follow `next_page_token` until it is empty.

Every paged request has `page_token` and every paged response `next_page_token` (AIP-158). The
iterators send a copy of the request with each token, so the caller's request is left alone.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Protocol, TypeVar

Metadata = tuple[tuple[str, str], ...]


class PagedRequest(Protocol):
    page_token: str


class Page(Protocol):
    next_page_token: str


Q = TypeVar("Q", bound=PagedRequest)
Q_contra = TypeVar("Q_contra", bound=PagedRequest, contravariant=True)
R = TypeVar("R", bound=Page)
R_co = TypeVar("R_co", bound=Page, covariant=True)
T = TypeVar("T")


class UnaryCall(Protocol[Q_contra, R_co]):
    """A blocking unary stub method, e.g. `AgentServiceStub(channel).ListAgents`."""

    def __call__(
        self, request: Q_contra, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> R_co: ...


class AsyncUnaryCall(Protocol[Q_contra, R_co]):
    """A grpc.aio unary stub method, e.g. `AgentServiceStub(aio_channel).ListAgents`."""

    def __call__(
        self, request: Q_contra, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Awaitable[R_co]: ...


def _with_token(request: Q, token: str) -> Q:
    paged = copy.deepcopy(request)
    paged.page_token = token
    return paged


def iter_pages(
    call: UnaryCall[Q, R], request: Q, *, timeout: float | None = None, metadata: Metadata | None = None
) -> Iterator[R]:
    """Every page of a List RPC, starting at `request.page_token`; `timeout` applies to each call."""
    token = request.page_token
    while True:
        page = call(_with_token(request, token), timeout=timeout, metadata=metadata)
        yield page
        token = page.next_page_token
        if not token:
            return


def iter_items(
    call: UnaryCall[Q, R],
    request: Q,
    items: Callable[[R], Iterable[T]],
    *,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Iterator[T]:
    """Every item of every page: `iter_items(stub.ListAgents, request, lambda page: page.agents)`."""
    for page in iter_pages(call, request, timeout=timeout, metadata=metadata):
        yield from items(page)


# `timeout` is each call's gRPC deadline, not a timeout of the whole iteration (hence noqa ASYNC109).
async def aiter_pages(
    call: AsyncUnaryCall[Q, R],
    request: Q,
    *,
    timeout: float | None = None,  # noqa: ASYNC109
    metadata: Metadata | None = None,
) -> AsyncIterator[R]:
    """The asyncio form of iter_pages."""
    token = request.page_token
    while True:
        page = await call(_with_token(request, token), timeout=timeout, metadata=metadata)
        yield page
        token = page.next_page_token
        if not token:
            return


async def aiter_items(
    call: AsyncUnaryCall[Q, R],
    request: Q,
    items: Callable[[R], Iterable[T]],
    *,
    timeout: float | None = None,  # noqa: ASYNC109
    metadata: Metadata | None = None,
) -> AsyncIterator[T]:
    """The asyncio form of iter_items."""
    async for page in aiter_pages(call, request, timeout=timeout, metadata=metadata):
        for item in items(page):
            yield item
