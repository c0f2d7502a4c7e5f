"""L2: Redis, shared by every server process. Values are `<version>:<wire bytes>`, or
`<version>!` (a tombstone: a deleted entity, or a cache repair), written only if newer than what
is there. A tombstone reads as a miss and refuses every older version."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from agentstore.redis.pipelined_get import PipelinedGet

# Set-if-newer and, in the same round trip, the cross-process invalidation message. ARGV[6] is
# the expiry option: PX (ARGV[3] milliseconds from now) or PXAT (ARGV[3] is a Unix time in ms).
_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
local applied = 0
if current then
  local v = tonumber(string.match(current, '^(%d+)'))
  local new = tonumber(ARGV[1])
  -- A copy of the very version a tombstone names may replace it: a repair's tombstone (cache
  -- repairs) then reads as a miss that the next fill of that version heals. No real row has the
  -- version of a delete's tombstone (the deleted version + 1; ids are never reused).
  if v == nil or v < new or (v == new and string.match(current, '^%d+!') and string.match(ARGV[2], '^%d+:')) then
    redis.call('SET', KEYS[1], ARGV[2], ARGV[6], ARGV[3])
    applied = 1
  end
else
  redis.call('SET', KEYS[1], ARGV[2], ARGV[6], ARGV[3])
  applied = 1
end
local receivers = 0
if ARGV[4] ~= '' then
  receivers = redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return {applied, receivers}
"""


@dataclass(frozen=True, slots=True)
class L2Entry:
    version: int
    payload: bytes | None  # None: the entity was deleted


def encode(version: int, payload: bytes | None) -> bytes:
    return f"{version}!".encode() if payload is None else f"{version}:".encode() + payload


def decode(raw: bytes) -> L2Entry | None:
    for i, byte in enumerate(raw[:21]):
        if byte == 0x3A:  # ':'
            return L2Entry(int(raw[:i]), raw[i + 1 :])
        if byte == 0x21:  # '!'
            return L2Entry(int(raw[:i]), None)
    return None


class L2Cache:
    def __init__(self, client: aioredis.Redis, ttl_seconds: float, getter: PipelinedGet | None = None) -> None:
        """`getter`, if given, serves `get` (the hot read path) instead of redis-py."""
        self._client = client
        self._get: Callable[[str], Awaitable[Any]] = getter.get if getter is not None else client.get
        self._ttl_ms = int(ttl_seconds * 1000)
        self._set_if_newer = client.register_script(_SET_IF_NEWER)

    @property
    def enabled(self) -> bool:
        return self._ttl_ms > 0

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    async def get(self, key: str) -> L2Entry | None:
        raw = await self._get(key)
        return decode(cast(bytes, raw)) if raw is not None else None

    async def get_many(self, keys: list[str]) -> list[L2Entry | None]:
        raws = await self._client.mget(keys)
        return [decode(cast(bytes, raw)) if raw is not None else None for raw in raws]

    async def set_if_newer(
        self,
        key: str,
        version: int,
        payload: bytes | None,
        *,
        channel: str = "",
        message: str = "",
        expire_at_ms: int | None = None,
    ) -> tuple[bool, int]:
        """Whether the value was written, and how many subscribers got `message` (if any).

        With `expire_at_ms` (a Unix time in milliseconds) the entry expires then instead of after
        the cache's TTL: an entity with its own lifetime leaves Redis exactly when it ends.
        """
        expiry, mode = self._expiry(expire_at_ms)
        applied, receivers = await self._set_if_newer(
            keys=[key], args=[version, encode(version, payload), expiry, channel, message, mode]
        )
        return bool(applied), int(receivers)

    async def set_many_if_newer(self, entries: Sequence[tuple[str, int, bytes | None, int | None]]) -> list[bool]:
        """set_if_newer for each (key, version, payload, expire_at_ms), in one round trip
        (a pipeline, not a transaction: each entry is its own set-if-newer)."""
        if len(entries) == 1:
            key, version, payload, expire_at_ms = entries[0]
            return [(await self.set_if_newer(key, version, payload, expire_at_ms=expire_at_ms))[0]]
        pipe = self._client.pipeline(transaction=False)
        for key, version, payload, expire_at_ms in entries:
            expiry, mode = self._expiry(expire_at_ms)
            await self._set_if_newer(
                keys=[key], args=[version, encode(version, payload), expiry, "", "", mode], client=pipe
            )
        return [bool(applied) for applied, _ in await pipe.execute()]

    def _expiry(self, expire_at_ms: int | None) -> tuple[int, str]:
        if expire_at_ms is not None:
            return expire_at_ms, "PXAT"
        return (self._ttl_ms if self._ttl_ms > 0 else 1), "PX"

    async def delete(self, keys: list[str]) -> None:
        if keys:
            await self._client.delete(*keys)
