"""PipelinedGet against a fake Redis: pipelining, handshake, error replies, timeouts, drops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentstore.redis.pipelined_get import PipelinedGet

Answer = Callable[[list[bytes]], bytes | None]  # the reply to send (RESP), or None: stay silent


class FakeRedis:
    """Answers each command with `answer(command)`; records commands and connections."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.received = asyncio.Event()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                self.commands.append(command)
                self.received.set()
                reply = self.answer(command)
                if reply is not None:
                    writer.write(reply)
        writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def store(data: dict[bytes, bytes]) -> Answer:
    def answer(command: list[bytes]) -> bytes | None:
        if command[0] == b"GET":
            return bulk(data.get(command[1]))
        return b"+OK\r\n"

    return answer


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Answer], FakeRedis]]:
    started: list[FakeRedis] = []

    def make(answer: Answer) -> FakeRedis:
        server = FakeRedis(answer)
        started.append(server)
        return server

    yield make
    for server in started:
        await server.close()


async def test_concurrent_gets_share_one_connection_in_order(fake) -> None:
    data = {f"k{i}".encode(): f"{i}:v{i}".encode() for i in range(50)}
    server = fake(store(data))
    getter = PipelinedGet("127.0.0.1", await server.start(), timeout=1.0)
    try:
        keys = [f"k{i}" for i in range(60)]
        values = await asyncio.gather(*(getter.get(k) for k in keys))
        assert values == [data.get(k.encode()) for k in keys]
        assert server.connections == 1
    finally:
        getter.close()


async def test_handshake_authenticates_and_selects_the_database(fake) -> None:
    server = fake(store({b"k": b"1:x"}))
    port = await server.start()
    getter = PipelinedGet.for_client(
        aioredis.from_url(f"redis://u:secret@127.0.0.1:{port}/3", socket_timeout=1.0, socket_connect_timeout=1.0)
    )
    assert getter is not None
    try:
        assert await getter.get("k") == b"1:x"
        assert server.commands == [[b"AUTH", b"u", b"secret"], [b"SELECT", b"3"], [b"GET", b"k"]]
    finally:
        getter.close()


async def test_error_reply_is_a_response_error(fake) -> None:
    server = fake(lambda command: b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    getter = PipelinedGet("127.0.0.1", await server.start(), timeout=1.0)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await getter.get("k")
    finally:
        getter.close()


async def test_timeout_drops_the_connection_and_the_next_get_reconnects(fake) -> None:
    silent = {"on": True}

    def answer(command: list[bytes]) -> bytes | None:
        return None if silent["on"] else bulk(b"2:y")

    server = fake(answer)
    getter = PipelinedGet("127.0.0.1", await server.start(), timeout=0.05)
    try:
        results = await asyncio.gather(getter.get("a"), getter.get("b"), return_exceptions=True)
        assert isinstance(results[0], RedisTimeoutError)
        assert isinstance(results[1], RedisTimeoutError | RedisConnectionError)
        silent["on"] = False
        assert await getter.get("c") == b"2:y"
        assert server.connections == 2
    finally:
        getter.close()


async def test_unreachable_server_is_a_connection_error(fake) -> None:
    server = fake(store({}))
    port = await server.start()
    await server.close()
    getter = PipelinedGet("127.0.0.1", port, timeout=0.5)
    with pytest.raises(RedisConnectionError):
        await getter.get("k")


async def test_server_closing_fails_pending_gets(fake) -> None:
    server = fake(lambda command: None)
    getter = PipelinedGet("127.0.0.1", await server.start(), timeout=5.0)
    try:
        pending = asyncio.ensure_future(getter.get("k"))
        await asyncio.wait_for(server.received.wait(), 5)
        for writer in server.writers:
            writer.close()
        with pytest.raises(RedisConnectionError):
            await pending
    finally:
        getter.close()


def test_only_plain_tcp_clients_are_served() -> None:
    assert PipelinedGet.for_client(aioredis.from_url("redis://127.0.0.1:6379/0", socket_timeout=0.05)) is not None
    assert PipelinedGet.for_client(aioredis.from_url("rediss://127.0.0.1:6379/0", socket_timeout=0.05)) is None
    assert PipelinedGet.for_client(aioredis.from_url("unix:///tmp/redis.sock", socket_timeout=0.05)) is None
    assert PipelinedGet.for_client(aioredis.from_url("redis://127.0.0.1:6379/0")) is None  # no timeout
