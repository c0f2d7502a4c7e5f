"""The request-scoped context: who calls, under which request id, until when.

The interceptor sets it once per RPC; servicers and the data layer read it. A ContextVar keeps
it out of every function signature while staying correct across concurrent RPCs.
"""

from __future__ import annotations

import enum
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass


class Role(enum.IntEnum):
    """API key roles, ordered so that a higher role includes the lower ones."""

    READER = 1
    WRITER = 2
    ADMIN = 3


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: uuid.UUID
    key_id: uuid.UUID | None
    role: Role
    # TenantService calls authenticated with the platform admin token.
    platform_admin: bool = False
    # The server's own background jobs (e.g. the lease sweeper), audited as actor "system".
    system: bool = False

    @property
    def actor(self) -> str:
        return "system" if self.system else "platform_admin" if self.platform_admin else "api_key"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    # time.monotonic() value after which the caller has given up; None without a deadline.
    deadline: float | None = None
    principal: Principal | None = None
    # `cache-control: no-cache` request metadata: read from PostgreSQL, skip both cache tiers.
    no_cache: bool = False
    # The RPC's short name (e.g. "CompleteTask"): labels the database statements it runs.
    method: str = ""

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


_current: ContextVar[RequestContext | None] = ContextVar("agentstore_request", default=None)


def current_request() -> RequestContext | None:
    return _current.get()


def set_current_request(ctx: RequestContext | None) -> None:
    _current.set(ctx)


def current_principal() -> Principal:
    ctx = _current.get()
    if ctx is None or ctx.principal is None:
        raise RuntimeError("no authenticated principal in this context")
    return ctx.principal


def cache_bypassed() -> bool:
    ctx = _current.get()
    return ctx is not None and ctx.no_cache
