"""A bounded LRU map whose entries expire a fixed time after they were set.

It does what cachetools.TTLCache did here, for less: TTLCache.get runs about ten Python-level
calls (a timer context manager, __contains__, __getitem__, ...), a large share of an L1-hit
GetAgent (L1 and the API key cache are both read on every such RPC). Here a hit is one dict
lookup, a clock read and a move_to_end.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlLru(Generic[K, V]):
    """At most `maxsize` entries (the least recently read or set go first), each readable for
    `ttl` seconds after it was set. Not thread-safe (used from the event loop only)."""

    __slots__ = ("_clock", "_data", "_maxsize", "_ttl")

    def __init__(self, maxsize: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if maxsize < 1 or ttl <= 0:
            raise ValueError("maxsize and ttl must be positive")
        self._maxsize = maxsize
        self._ttl = ttl
        self._clock = clock
        # key → (expiry on the clock, value), least recently used first.
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    def __setitem__(self, key: K, value: V) -> None:
        now = self._clock()
        data = self._data
        data[key] = (now + self._ttl, value)
        data.move_to_end(key)
        while len(data) > self._maxsize:
            data.popitem(last=False)
        # Expired entries at the cold end go now rather than when the map is full.
        while True:
            oldest = next(iter(data))
            if data[oldest][0] > now:
                break
            del data[oldest]

    def pop(self, key: K) -> V | None:
        item = self._data.pop(key, None)
        return item[1] if item is not None and item[0] > self._clock() else None

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the live entries."""
        now = self._clock()
        return [(k, value) for k, (expires, value) in self._data.items() if expires > now]

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for expires, _ in self._data.values() if expires > now)
