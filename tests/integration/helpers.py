"""Shared helpers for the integration tests: decoding rich gRPC errors and small factories."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from agentstore.v1 import agent_pb2, agent_service_pb2

DOMAIN = "agentstore"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

Metadata = tuple[tuple[str, str], ...]


@dataclass
class RpcFailure:
    """What an RPC failed with: the raw error, its google.rpc.Status and the unpacked details."""

    error: grpc.aio.AioRpcError
    status: status_pb2.Status
    info: error_details_pb2.ErrorInfo
    violations: list[error_details_pb2.BadRequest.FieldViolation] = field(default_factory=list)

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code()

    @property
    def message(self) -> str:
        return self.status.message

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]

    def trailer(self, key: str) -> str | bytes | None:
        return metadata_value(self.error.trailing_metadata(), key)


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> Any:
    """The first value of `key` in gRPC metadata (a grpc.aio.Metadata or a tuple of pairs)."""
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def rpc_status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status of an aio error: grpc_status.rpc_status.from_call for grpc.aio.

    Checks, like from_call does, that the status agrees with the call's code and details.
    """
    raw = metadata_value(error.trailing_metadata(), STATUS_DETAILS_KEY)
    assert raw is not None, f"{error.code().name} {error.details()!r} carries no {STATUS_DETAILS_KEY}"
    status = status_pb2.Status.FromString(raw if isinstance(raw, bytes) else raw.encode("latin-1"))
    assert status.code == error.code().value[0], (status.code, error.code())
    assert status.message == error.details(), (status.message, error.details())
    return status


def unpack_failure(error: grpc.aio.AioRpcError) -> RpcFailure:
    status = rpc_status_of(error)
    infos: list[error_details_pb2.ErrorInfo] = []
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(bad_request.field_violations)
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {len(infos)}: {status}"
    return RpcFailure(error, status, infos[0], violations)


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    reason: str | None = None,
    *,
    field: str | None = None,
) -> RpcFailure:
    """Await `call`, assert it fails with `code` (and ErrorInfo `reason`, domain "agentstore").

    With `field`, also assert a google.rpc.BadRequest field violation names that field.
    """
    try:
        result = await call
    except grpc.aio.AioRpcError as exc:
        error = exc
    else:
        raise AssertionError(f"expected {code.name} {reason or ''}, but the call returned {result!r}")
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    failure = unpack_failure(error)
    assert failure.info.domain == DOMAIN, failure.info
    if reason is not None:
        assert failure.info.reason == reason, f"expected reason {reason}, got {failure.info.reason}: {failure.message}"
    if field is not None:
        assert field in failure.fields, f"no field violation for {field!r}: {failure.fields}"
    return failure


def unique(label: str = "x") -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def agent(name: str | None = None, **fields: Any) -> agent_pb2.Agent:
    """An Agent message; `metadata` may be given as a plain dict."""
    metadata = fields.pop("metadata", None)
    message = agent_pb2.Agent(name=name if name is not None else unique("agent"), **fields)
    if metadata is not None:
        message.metadata.update(metadata)
    return message


async def create_agent(stub: Any, md: Metadata, name: str | None = None, **fields: Any) -> agent_pb2.Agent:
    request_id = fields.pop("request_id", "")
    return await stub.CreateAgent(
        agent_service_pb2.CreateAgentRequest(agent=agent(name, **fields), request_id=request_id), metadata=md
    )


async def list_all(
    stub: Any,
    md: Metadata,
    *,
    filter: str = "",
    order_by: str = "",
    page_size: int = 0,
) -> list[agent_pb2.Agent]:
    """Every agent a ListAgents query returns, following next_page_token to the end."""
    agents: list[agent_pb2.Agent] = []
    token = ""
    for _ in range(10_000):
        response = await stub.ListAgents(
            agent_service_pb2.ListAgentsRequest(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token
            ),
            metadata=md,
        )
        agents.extend(response.agents)
        token = response.next_page_token
        if not token:
            return agents
    raise AssertionError("ListAgents never returned an empty next_page_token")


def ids(agents: Sequence[agent_pb2.Agent]) -> list[str]:
    return [a.id for a in agents]


async def run_command(
    *argv: str, env: dict[str, str] | None = None, cwd: str | None = None, limit: float = 60
) -> tuple[int, str, str]:
    """Run a program to completion (killed after `limit` seconds) and return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=limit)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class HeldFills:
    """The stale-set race, forced: while active, every fill of `cache` (an EntityCache) stops
    between its database read and its cache write until `release()` (the before_fill hook)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache
        self._read = asyncio.Event()
        self._release = asyncio.Event()

    async def _hold(self, _key: object) -> None:
        self._read.set()
        await self._release.wait()

    def __enter__(self) -> HeldFills:
        self._cache.before_fill = self._hold
        return self

    def __exit__(self, *exc: object) -> None:
        self._cache.before_fill = None

    async def read_done(self) -> None:
        """Until a reader has read the database and waits to fill."""
        await asyncio.wait_for(self._read.wait(), 5)

    def release(self) -> None:
        self._release.set()


async def caches_trusted(*apps: Any) -> None:
    """Until every app's invalidation bus is subscribed and its cache leases are fresh
    (cache/trust.py): before a test counts cache hits."""
    for _ in range(500):
        if all(a.bus.connected and a.deps.trust.l1() and a.deps.trust.l2() for a in apps):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the caches never became trusted")
