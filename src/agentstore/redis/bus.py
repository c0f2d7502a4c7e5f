"""The bus between server processes, over Redis pub/sub: cache invalidations (acknowledged, so
that L1 can trust them), and hints that need no acknowledgement (a task is ready to claim, an
API key was revoked).

Each server process holds one subscriber connection. A writer publishes `kind:key` after commit
(in the same Redis round trip as its L2 write); every process drops what it cached under that key.

Redis delivers a published message to subscribers asynchronously: under CPU contention the
publisher's reply can arrive milliseconds before a subscriber's copy (measured here: up to 5 ms).
So a writer does not return until every other subscribed process has acknowledged the
invalidation (each process has its own ack channel); only then is "update via A, then Get via B"
guaranteed to see the new version. When a process does not acknowledge within the ack timeout
(logged and counted), the writer waits one cache lease before it answers (cache/trust.py): by
then the silent process has applied the invalidation or stopped trusting its L1.

The subscription is a plain non-blocking socket parsed with hiredis rather than redis-py's
PubSub: the event loop calls `drain()` as soon as bytes arrive, and it applies every complete
message in one pass with no task switches, then acknowledges.

While the subscription is down, messages are lost: `connected` is False, L1 must not be used,
and every (re)subscribe calls `on_resync` so caches drop what could have missed a message. A PING
every 100 ms renews the L1 lease when it is answered (everything published before it was applied
first: one socket, in order), so a subscription that hangs without closing (a frozen Redis) stops
L1 within a lease; one unanswered for 3 s is dropped and made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.connection import parse_url

from agentstore import metrics
from agentstore.cache.trust import CacheTrust
from agentstore.jobs import cancel_and_wait
from agentstore.redis.errors import REDIS_ERRORS

log = logging.getLogger(__name__)

# The subscription is PINGed this often; each answered PING renews this process's L1 lease
# (cache/trust.py). A subscription silent for _DEAD_AFTER is dropped and made again.
_PING_INTERVAL = 0.1
_DEAD_AFTER = 3.0


@dataclass
class _AckWait:
    received: int = 0
    needed: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Subscriber:
    on_message: Callable[[str], None]
    on_resync: Callable[[], None]


def _command(*parts: str | bytes) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class ProcessBus:
    def __init__(
        self,
        redis_url: str,
        channel: str,
        publisher: aioredis.Redis,
        trust: CacheTrust,
        ack_timeout: float = 0.25,
        connect_timeout: float = 1.0,
    ) -> None:
        self._trust = trust
        self._params: dict[str, Any] = parse_url(redis_url)  # type: ignore[no-untyped-call]
        self._publisher = publisher
        self._channel = channel
        self.process_id = uuid.uuid4().hex[:16]
        self._ack_channel = f"{channel}:ack:{self.process_id}".encode()
        self._ack_timeout = ack_timeout
        self._sequence = itertools.count(1)
        self._acks: dict[int, _AckWait] = {}
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._connect_timeout = connect_timeout
        self._subscribers: dict[str, Subscriber] = {}
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader()
        self._last_seen = 0.0
        self._task: asyncio.Task[None] | None = None
        self._ever_connected = False
        self._lost = asyncio.Event()

    @property
    def channel(self) -> str:
        return self._channel

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def subscribe(self, kind: str, subscriber: Subscriber) -> None:
        self._subscribers[kind] = subscriber

    def envelope(self, kind: str, key: str) -> tuple[int, str]:
        """A sequence number and the message to publish for an invalidation of kind:key."""
        sequence = next(self._sequence)
        self._acks[sequence] = _AckWait()
        return sequence, f"{self.process_id} {sequence} {kind}:{key}"

    async def acknowledged(self, sequence: int, receivers: int) -> bool:
        """Wait until every other process that received message `sequence` has applied it."""
        wait = self._acks.get(sequence)
        if wait is None:
            return True
        try:
            # Our own subscription counts among the receivers but does not acknowledge.
            wait.needed = receivers - (1 if self.connected else 0)
            if wait.received >= wait.needed:
                return True
            try:
                await asyncio.wait_for(wait.done.wait(), self._ack_timeout)
                return True
            except TimeoutError:
                metrics.CACHE_ACK_TIMEOUTS.inc()
                log.warning(
                    "invalidation not acknowledged in time",
                    extra={"received": wait.received, "needed": wait.needed},
                )
                return False
        finally:
            self._acks.pop(sequence, None)

    def forget(self, sequence: int) -> None:
        self._acks.pop(sequence, None)

    async def publish(self, kind: str, key: str) -> bool:
        """Publish and wait for the acknowledgements; False when Redis could not be reached."""
        sequence, message = self.envelope(kind, key)
        try:
            receivers = await self.publish_envelope(message)
        except REDIS_ERRORS as exc:
            self.forget(sequence)
            log.warning("invalidation not published", extra={"kind": kind, "error": type(exc).__name__})
            return False
        metrics.CACHE_INVALIDATIONS_SENT.inc()
        return await self.acknowledged(sequence, receivers)

    async def publish_envelope(self, message: str) -> int:
        """Publish a message made by `envelope`; how many subscribers received it."""
        return int(await self._publisher.publish(self._channel, message))

    async def notify(self, kind: str, key: str) -> bool:
        """Publish without waiting for acknowledgements (a hint, e.g. "a task is ready")."""
        try:
            await self._publisher.publish(self._channel, f"{self.process_id} - {kind}:{key}")
        except REDIS_ERRORS as exc:
            log.warning("notification not published", extra={"kind": kind, "error": type(exc).__name__})
            return False
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="invalidation-bus")

    async def close(self) -> None:
        await cancel_and_wait([self._task, *self._ack_tasks])
        self._disconnect()

    def drain(self) -> None:
        """Apply every invalidation already received, without waiting for the event loop."""
        sock = self._sock
        if sock is None:
            return
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    self._lose("closed by Redis")
                    return
                self._reader.feed(data)
                self._last_seen = time.monotonic()
                if len(data) < 65536:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._lose(type(exc).__name__)
            return
        self._dispatch_all()

    def _dispatch_all(self) -> None:
        while True:
            try:
                item = self._reader.gets()
            except hiredis.ProtocolError:
                self._lose("protocol error")
                return
            if item is False:
                return
            if isinstance(item, list) and len(item) == 3 and item[0] == b"message":
                if item[1] == self._ack_channel:
                    self._on_ack(item[2])
                else:
                    self._on_invalidation(item[2])
            elif isinstance(item, list) and len(item) == 2 and item[0] == b"pong":
                # Everything Redis published before it answered this PING has been applied above.
                try:
                    self._trust.pong(float(item[1]))
                except ValueError:
                    pass

    def _on_ack(self, data: bytes) -> None:
        try:
            wait = self._acks.get(int(data))
        except ValueError:
            return
        if wait is not None:
            wait.received += 1
            if wait.needed is not None and wait.received >= wait.needed:
                wait.done.set()

    def _on_invalidation(self, data: bytes) -> None:
        metrics.CACHE_INVALIDATIONS_RECEIVED.inc()
        origin, _, rest = data.decode(errors="replace").partition(" ")
        sequence, _, body = rest.partition(" ")
        kind, _, key = body.partition(":")
        subscriber = self._subscribers.get(kind)
        if subscriber is not None:
            subscriber.on_message(key)
        if origin != self.process_id and sequence.isdigit():
            task = asyncio.get_running_loop().create_task(self._ack(origin, sequence))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)

    async def _ack(self, origin: str, sequence: str) -> None:
        try:
            await self._publisher.publish(f"{self._channel}:ack:{origin}", sequence)
        except REDIS_ERRORS as exc:  # the writer times out waiting and logs it
            log.info("acknowledgement not sent", extra={"error": type(exc).__name__})

    def _lose(self, why: str) -> None:
        if self._sock is None:
            return
        self._disconnect()
        self._trust.unsubscribed()
        log.warning("invalidation bus lost its subscription; L1 is off until it returns", extra={"error": why})
        for subscriber in self._subscribers.values():
            subscriber.on_resync()
        self._lost.set()

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        if "path" in self._params:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = self._params["path"]
        else:
            host, port = self._params.get("host", "127.0.0.1"), int(self._params.get("port", 6379))
            info = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, address = info[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await loop.sock_connect(sock, address)
                reader = hiredis.Reader()
                commands = []
                if self._params.get("password"):
                    auth = [self._params["username"]] if self._params.get("username") else []
                    commands.append(_command("AUTH", *auth, self._params["password"]))
                commands.append(_command("SUBSCRIBE", self._channel, self._ack_channel))
                await loop.sock_sendall(sock, b"".join(commands))
                expected = len(commands) + 1  # SUBSCRIBE confirms each channel
                while expected:
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise ConnectionError("closed during subscribe")
                    reader.feed(data)
                    while expected and (reply := reader.gets()) is not False:
                        if isinstance(reply, hiredis.ReplyError):
                            raise ConnectionError(str(reply))
                        expected -= 1
        except hiredis.ProtocolError as exc:
            sock.close()
            raise ConnectionError(f"not a Redis reply: {exc}") from None
        except BaseException:
            sock.close()
            raise
        self._reader = reader
        return sock

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                sock = await self._connect()
            except REDIS_ERRORS as exc:
                if self._ever_connected and delay == 0.05:
                    log.info("invalidation bus cannot resubscribe yet", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            # Anything cached before this point may have missed a message.
            for subscriber in self._subscribers.values():
                subscriber.on_resync()
            self._sock = sock
            self._lost.clear()
            self._last_seen = time.monotonic()
            asyncio.get_running_loop().add_reader(sock.fileno(), self.drain)
            log.log(
                logging.WARNING if self._ever_connected else logging.INFO,
                "invalidation bus subscribed",
                extra={"channel": self._channel},
            )
            self._ever_connected = True
            await self._watch()

    async def _watch(self) -> None:
        """PING the subscription until it fails; a PING answered proves nothing was missed."""
        while self._sock is not None:
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=_PING_INTERVAL)
                return
            except TimeoutError:
                pass
            sock = self._sock
            if sock is None:
                return
            if time.monotonic() - self._last_seen > _DEAD_AFTER:
                self._lose("no answer to PING")
                return
            try:
                sock.send(_command("PING", repr(time.monotonic())))
            except OSError as exc:
                self._lose(type(exc).__name__)
                return
