"""The composition root: a failed start closes what it opened, and the interceptor wraps
server-streaming RPCs as it wraps unary ones (auth, errors → status, request id, metrics)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY

from agentstore.context import current_principal
from agentstore.deps import Add, Deps, Resource
from agentstore.errors import StartupError, invalid_argument
from agentstore.server import RESOURCES, start_server
from agentstore.v1 import agent_pb2, agent_service_pb2
from tests.conftest import APP_ROLE, ScratchDatabase, Servers
from tests.integration.conftest import TenantKeys, server_settings
from tests.integration.helpers import unpack_failure

STREAM_SERVICE = "agentstore.test.StreamService"
WATCH = f"/{STREAM_SERVICE}/WatchThings"


async def app_backends(servers: Servers, database: ScratchDatabase) -> int:
    con = await asyncpg.connect(servers.admin_url)
    try:
        count: int = await con.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND usename = $2", database.name, APP_ROLE
        )
        return count
    finally:
        await con.close()


async def test_a_start_that_cannot_listen_leaves_no_connection_behind(
    servers: Servers, database: ScratchDatabase, redis_prefix: str
) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        before = await app_backends(servers, database)
        settings = server_settings(
            redis_prefix, listen_address=f"127.0.0.1:{taken.getsockname()[1]}", db_pool_min_size=3
        )
        with pytest.raises(StartupError, match="cannot listen"):
            await start_server(settings, database.app_url, servers.redis_url)
        # The pool's connections were opened (min size 3) and must all be gone again.
        for _ in range(100):
            if await app_backends(servers, database) == before:
                break
            await asyncio.sleep(0.05)
        assert await app_backends(servers, database) == before
    finally:
        taken.close()


class StreamServicer:
    """A server-streaming RPC registered through the interceptor: `id` says how it ends."""

    async def WatchThings(self, request: agent_service_pb2.GetAgentRequest, context: Any) -> AsyncIterator[Any]:
        tenant = current_principal().tenant_id  # the interceptor authenticated the caller
        for i in range(3):
            yield agent_pb2.Agent(id=str(tenant), name=f"thing-{i}")
        if request.id == "refuse":
            raise invalid_argument("NO_MORE_THINGS", "the stream ends here", [("id", "refused")])
        if request.id == "bug":
            raise RuntimeError("a bug in a streaming servicer")


def add_stream_servicer(servicer: StreamServicer, server: Any) -> None:
    handler = grpc.unary_stream_rpc_method_handler(
        servicer.WatchThings,
        request_deserializer=agent_service_pb2.GetAgentRequest.FromString,
        response_serializer=agent_pb2.Agent.SerializeToString,
    )
    server.add_registered_method_handlers(STREAM_SERVICE, {"WatchThings": handler})


def register_stream(add: Add, deps: Deps) -> None:
    add(add_stream_servicer, StreamServicer())


@pytest.fixture(scope="module")
async def stream_channel(
    servers: Servers, database: ScratchDatabase, redis_prefix: str
) -> AsyncIterator[grpc.aio.Channel]:
    resources = (*RESOURCES, Resource(STREAM_SERVICE, register_stream))
    app = await start_server(server_settings(redis_prefix), database.app_url, servers.redis_url, resources)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield channel
    finally:
        await app.stop(0)


def watch(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        WATCH,
        request_serializer=agent_service_pb2.GetAgentRequest.SerializeToString,
        response_deserializer=agent_pb2.Agent.FromString,
    )


async def test_a_stream_is_authenticated_and_carries_the_request_id(stream_channel, tenant: TenantKeys) -> None:
    call = watch(stream_channel)(
        agent_service_pb2.GetAgentRequest(id="all"), metadata=(*tenant.md("reader"), ("x-request-id", "rid-42"))
    )
    things = [thing async for thing in call]
    assert [t.name for t in things] == ["thing-0", "thing-1", "thing-2"]
    assert {t.id for t in things} == {tenant.tenant.id}  # the caller's own tenant
    assert await call.code() == grpc.StatusCode.OK
    assert ("x-request-id", "rid-42") in tuple(await call.trailing_metadata())
    handled = REGISTRY.get_sample_value("agentstore_rpc_total", {"method": WATCH, "code": "OK"})
    assert handled is not None and handled >= 1


async def test_a_stream_without_a_key_gets_nothing(stream_channel) -> None:
    call = watch(stream_channel)(agent_service_pb2.GetAgentRequest(id="all"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pytest.fail("a message reached a caller without a key")
    assert unpack_failure(raised.value).info.reason == "API_KEY_MISSING"
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("ending", "code", "reason"),
    [("refuse", grpc.StatusCode.INVALID_ARGUMENT, "NO_MORE_THINGS"), ("bug", grpc.StatusCode.INTERNAL, "INTERNAL")],
)
async def test_an_error_mid_stream_ends_it_with_its_status(
    stream_channel, tenant: TenantKeys, ending: str, code: grpc.StatusCode, reason: str
) -> None:
    call = watch(stream_channel)(agent_service_pb2.GetAgentRequest(id=ending), metadata=tenant.md("reader"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for thing in call:
            received.append(thing.name)
    assert received == ["thing-0", "thing-1", "thing-2"]
    failure = unpack_failure(raised.value)
    assert (failure.code, failure.info.reason) == (code, reason)
    assert failure.trailer("x-request-id")


async def test_malformed_bytes_to_a_stream_are_invalid_argument(stream_channel, tenant: TenantKeys) -> None:
    raw = stream_channel.unary_stream(WATCH, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in raw(b"\xff\xff\xff", metadata=tenant.md("reader")):
            pass
    assert unpack_failure(raised.value).info.reason == "MALFORMED_REQUEST"
