"""L1: a per-process LRU of serialized protos, each tagged with its row version.

An entry either holds wire bytes (a hit) or is a marker that only remembers the lowest version
still acceptable. Invalidations leave markers instead of deleting, so that a reader that read an
older row before the write committed cannot put it back afterwards (the stale-set race).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from cachetools import TTLCache


@dataclass(slots=True, frozen=True)
class Entry:
    version: int
    # None: a marker. Versions below `version` are stale; nothing is cached yet.
    payload: bytes | None


class L1Cache:
    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._data: TTLCache[Hashable, Entry] | None = (
            TTLCache(maxsize=max_entries, ttl=ttl_seconds) if max_entries > 0 and ttl_seconds > 0 else None
        )

    @property
    def enabled(self) -> bool:
        return self._data is not None

    def get(self, key: Hashable) -> bytes | None:
        if self._data is None:
            return None
        entry = self._data.get(key)
        return entry.payload if entry is not None else None

    def put_if_newer(self, key: Hashable, version: int, payload: bytes) -> bool:
        """Cache `payload` unless something at least as new is known. False: a rejected stale set."""
        if self._data is None:
            return False
        current = self._data.get(key)
        if current is not None and (
            version < current.version or (version == current.version and current.payload is not None)
        ):
            return version == current.version
        self._data[key] = Entry(version, payload)
        return True

    def invalidate(self, key: Hashable, min_version: int) -> None:
        """Everything below `min_version` is stale from now on."""
        if self._data is None:
            return
        current = self._data.get(key)
        if current is None or current.version < min_version:
            self._data[key] = Entry(min_version, None)

    def entry(self, key: Hashable) -> Entry | None:
        return self._data.get(key) if self._data is not None else None

    def drop(self, key: Hashable) -> None:
        if self._data is not None:
            self._data.pop(key, None)

    def clear(self) -> None:
        if self._data is not None:
            self._data.clear()
