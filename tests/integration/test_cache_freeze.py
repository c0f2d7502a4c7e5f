"""Never stale after a write, when Redis freezes (SIGSTOP: sockets stay open, nothing answers).

Servers A and B (and a writer W) share PostgreSQL and a redis-server this test owns. Before the
cache leases (cache/trust.py) and repairs (cache/repairs.py): an update on A during the freeze
answered OK while B kept serving the old version from its L1 (its subscription socket never
closed); and a writer that died during a freeze left the old version in Redis after it thawed,
for every process, until the entry's TTL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from agentstore.devtools.embedded import EmbeddedRedis, free_port
from agentstore.server import App, start_server
from agentstore.v1 import agent_service_pb2_grpc
from tests.conftest import ScratchDatabase
from tests.integration import conftest as itc
from tests.integration.helpers import caches_trusted, create_agent
from tests.integration.test_cache import counter, get, rename, version_of

pytestmark = pytest.mark.slow

# Short Redis timeouts, so that a frozen Redis is noticed quickly; the default lease.
SETTINGS = {"redis_timeout_seconds": 0.2}


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", port=free_port(), append_only=False)
    server.start()
    yield server
    server.stop(force=True)  # SIGCONT first if a test failed while it was stopped: see freeze()


class Freeze:
    def __init__(self, server: EmbeddedRedis) -> None:
        proc = server._proc
        assert proc is not None
        self.pid = proc.pid

    def __enter__(self) -> Freeze:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture
def own_prefix(redis_prefix: str) -> str:
    """A deployment of its own: its repairs are never done by the suite's other servers (which
    share the database but use another Redis)."""
    return f"{redis_prefix}{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def servers3(frozen_redis: EmbeddedRedis, database: ScratchDatabase, own_prefix: str) -> AsyncIterator[list[App]]:
    apps = [
        await start_server(itc.server_settings(own_prefix, **SETTINGS), database.app_url, frozen_redis.url)
        for _ in range(3)
    ]
    try:
        await caches_trusted(*apps)
        yield apps
    finally:
        for app in apps:
            await app.stop(0)


class Blackhole:
    """A TCP proxy in front of Redis that can stop forwarding without closing anything: to the
    process behind it, Redis hangs (a partition that only it sees; Redis stays up for the others)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self.blocked = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not self.blocked:  # blocked: the bytes vanish, the connection stays open
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()


def stub(app: App, channels: list[grpc.aio.Channel]) -> agent_service_pb2_grpc.AgentServiceStub:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    channels.append(channel)
    return agent_service_pb2_grpc.AgentServiceStub(channel)


async def test_an_update_during_a_freeze_is_never_stale_on_another_process(
    servers3: list[App], frozen_redis: EmbeddedRedis, new_tenant
) -> None:
    a, b, _ = servers3
    tenant = await new_tenant("freeze")
    channels: list[grpc.aio.Channel] = []
    try:
        sa, sb = stub(a, channels), stub(b, channels)
        for round_ in range(5):
            created = await create_agent(sa, tenant.md())
            assert await get(sb, tenant.md(), created.id) == created  # B caches version 1
            key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
            assert b.caches["agent"]._l1.get(key) is not None
            with Freeze(frozen_redis):
                await asyncio.sleep(0.05 * round_)  # anywhere from 0 to 0.2 s into the freeze
                updated = await rename(sa, tenant.md(), created.id)
                seen = await get(sb, tenant.md(), created.id)
                assert version_of(seen) >= version_of(updated), f"round {round_}: B answered a stale version"
            assert await get(sb, tenant.md(), created.id) == updated
    finally:
        for channel in channels:
            await channel.close()
    assert counter("agentstore_cache_unconfirmed_writes_total", kind="agent") >= 5


async def test_a_writer_that_dies_during_a_freeze_leaves_nothing_stale(
    servers3: list[App], frozen_redis: EmbeddedRedis, new_tenant
) -> None:
    a, b, w = servers3
    tenant = await new_tenant("dead-writer")
    channels: list[grpc.aio.Channel] = []
    try:
        sa, sb, sw = stub(a, channels), stub(b, channels), stub(w, channels)
        created = await create_agent(sa, tenant.md())
        assert await get(sb, tenant.md(), created.id) == created  # Redis holds version 1
        with Freeze(frozen_redis):
            updated = await rename(sw, tenant.md(), created.id)
            # W goes away at once: whatever it still meant to do to Redis dies with it.
            await w.stop(0)
        for check in (0.0, 0.3, 1.0):
            await asyncio.sleep(check)
            for s in (sa, sb):
                assert await get(s, tenant.md(), created.id) == updated, f"stale {check} s after the thaw"
        # The repair was done by the survivors, and caching works again.
        key = (uuid.UUID(tenant.tenant.id), uuid.UUID(created.id))
        for _ in range(100):
            if a.deps.trust.l2() and b.deps.trust.l2():
                break
            await asyncio.sleep(0.05)
        b.caches["agent"]._l1.drop(key)  # so that B reads through L2 (its tombstone) and fills it
        assert await get(sb, tenant.md(), created.id) == updated
        assert (await b.caches["agent"].peek(key))[1] == version_of(updated)
    finally:
        for channel in channels:
            await channel.close()


async def test_a_writer_cut_off_from_redis_is_not_stale_elsewhere_even_after_it_dies(
    frozen_redis: EmbeddedRedis, database: ScratchDatabase, own_prefix: str, new_tenant
) -> None:
    """W reaches Redis through a proxy that silently drops its bytes, while A and B reach Redis
    directly: W's invalidation never arrives, and B's subscription stays healthy. B must still not
    answer the old version after W's update returns, nor A and B after W is gone."""
    proxy = Blackhole(frozen_redis.port)
    proxied = await proxy.start()
    settings = itc.server_settings(own_prefix, **SETTINGS)
    a = await start_server(settings, database.app_url, frozen_redis.url)
    b = await start_server(settings, database.app_url, frozen_redis.url)
    w = await start_server(settings, database.app_url, proxied)
    channels: list[grpc.aio.Channel] = []
    stopped = False
    try:
        await caches_trusted(a, b, w)
        tenant = await new_tenant("cut-off")
        sa, sb, sw = stub(a, channels), stub(b, channels), stub(w, channels)
        created = await create_agent(sa, tenant.md())
        assert await get(sb, tenant.md(), created.id) == created  # B's L1 and Redis hold version 1
        proxy.blocked = True
        updated = await rename(sw, tenant.md(), created.id)
        assert version_of(await get(sb, tenant.md(), created.id)) == version_of(updated)
        await w.stop(0)
        stopped = True
        for check in (0.0, 0.3, 1.0):
            await asyncio.sleep(check)
            for s in (sa, sb):
                assert await get(s, tenant.md(), created.id) == updated, f"stale {check} s after W went"
    finally:
        for channel in channels:
            await channel.close()
        for app in (a, b, *([] if stopped else [w])):
            await app.stop(0)
        await proxy.close()
