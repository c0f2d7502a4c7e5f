"""GET over one pipelined Redis connection: the L2 read path, without redis-py's per-command cost.

A redis-py asyncio command takes a pooled connection, wraps the write and the read in timeouts,
runs retry and observability hooks and gives the connection back: about ten times the CPU of
the round trip itself, which made an L2 hit cost more than the rest of the RPC. Here every GET
is one write to a shared connection and a future resolved by `data_received`; Redis answers in
request order, so concurrent GETs simply queue on the connection (and share reads).

Semantics match redis-py's for the caller: each GET fails with redis-py's TimeoutError after the
client's socket timeout, ConnectionError when Redis cannot be reached or the connection drops,
ResponseError on an error reply. A timeout drops the connection (as redis-py does): the next GET
opens a new one. Only plain TCP clients are served (`for_client` returns None otherwise, and the
caller keeps redis-py); every other command stays on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _pack(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    """Replies are matched to requests in order; a waiter that gave up still takes its reply."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def send(self, command: bytes, waiter: asyncio.Future[Any]) -> None:
        if self._transport is None:
            raise RedisConnectionError("Connection closed.")
        self._waiters.append(waiter)
        self._transport.write(command)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                waiter = self._waiters.popleft()
                if waiter.done():
                    continue  # timed out or cancelled
                if isinstance(reply, hiredis.ReplyError):
                    waiter.set_exception(ResponseError(str(reply)))
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.abort(RedisConnectionError(f"Protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(RedisConnectionError("Connection closed by server."))

    def abort(self, exc: Exception) -> None:
        """Close the connection and fail every pending request with `exc`."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)


def _expire(waiter: asyncio.Future[Any], protocol: _Protocol) -> None:
    if not waiter.done():
        waiter.set_exception(RedisTimeoutError("Timeout reading from socket"))
        # Later replies would still match their requests, but a connection that stopped
        # answering must not be kept (redis-py drops it too): the next GET opens a new one.
        protocol.abort(RedisConnectionError("Connection dropped after a timeout."))


class PipelinedGet:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float,
        connect_timeout: float | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._timeout = timeout
        self._connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self._handshake: list[bytes] = []
        if password is not None:
            auth = (username.encode(), password.encode()) if username is not None else (password.encode(),)
            self._handshake.append(_pack(b"AUTH", *auth))
        if db:
            self._handshake.append(_pack(b"SELECT", str(db).encode()))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def for_client(cls, client: aioredis.Redis) -> PipelinedGet | None:
        """One for the server of a plain TCP client (same address, database, credentials and
        timeouts); None for anything else (TLS, Unix socket, cluster), which keeps redis-py."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if (
            pool.connection_class is not Connection
            or kwargs.get("credential_provider") is not None
            or kwargs.get("decode_responses")
        ):
            return None
        timeout = kwargs.get("socket_timeout")
        if not timeout:
            return None  # no timeout to keep: not worth a second implementation
        return cls(
            kwargs.get("host", "localhost"),
            int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db", 0)),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            timeout=timeout,
            connect_timeout=kwargs.get("socket_connect_timeout"),
        )

    async def get(self, key: str) -> bytes | None:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes | None] = loop.create_future()
        k = key.encode()
        protocol.send(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k), reply)
        # A timer per GET (not asyncio.timeout, which costs several times more).
        timer = loop.call_later(self._timeout, _expire, reply, protocol)
        try:
            return await reply
        finally:
            timer.cancel()

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection attempt at a time; the rest use its result
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(_Protocol, self._host, self._port), self._connect_timeout
                )
            except TimeoutError:
                raise RedisTimeoutError("Timeout connecting to server") from None
            except OSError as exc:
                raise RedisConnectionError(f"Error connecting to {self._host}:{self._port}. {exc}") from exc
            try:
                for command in self._handshake:
                    waiter: asyncio.Future[Any] = loop.create_future()
                    protocol.send(command, waiter)
                    try:
                        await asyncio.wait_for(waiter, self._timeout)
                    except TimeoutError:
                        raise RedisTimeoutError("Timeout reading from socket") from None
            except BaseException:
                protocol.abort(RedisConnectionError("Connection setup failed."))
                raise
            self._protocol = protocol
            return protocol

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.abort(RedisConnectionError("Connection closed."))
            self._protocol = None
