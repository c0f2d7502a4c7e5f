"""L1: a per-process LRU of serialized protos, each tagged with its row version.

An entry either holds wire bytes (a hit) or is a marker that only remembers the lowest version
still acceptable. Invalidations leave markers instead of deleting, so that a reader that read an
older row before the write committed cannot put it back afterwards (the stale-set race).

Keys are (tenant, id) UUID pairs, stored as their 128-bit ints: UUID's __hash__ and __eq__ run
in Python, and a tuple of UUIDs is hashed and compared again on every dict operation (about
a microsecond of each L1 hit).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from agentstore.cache.lru import TtlLru

Key = tuple[uuid.UUID, uuid.UUID]  # (tenant, id)


@dataclass(slots=True, frozen=True)
class Entry:
    version: int
    # None: a marker. Versions below `version` are stale; nothing is cached yet.
    payload: bytes | None


class L1Cache:
    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._data: TtlLru[tuple[int, int], Entry] | None = (
            TtlLru(max_entries, ttl_seconds) if max_entries > 0 and ttl_seconds > 0 else None
        )

    @property
    def enabled(self) -> bool:
        return self._data is not None

    def get(self, key: Key) -> bytes | None:
        if self._data is None:
            return None
        entry = self._data.get((key[0].int, key[1].int))
        return entry.payload if entry is not None else None

    def put_if_newer(self, key: Key, version: int, payload: bytes) -> bool:
        """Cache `payload` unless something at least as new is known. False: a rejected stale set."""
        if self._data is None:
            return False
        ikey = _ints(key)
        current = self._data.get(ikey)
        if current is not None and (
            version < current.version or (version == current.version and current.payload is not None)
        ):
            return version == current.version
        self._data[ikey] = Entry(version, payload)
        return True

    def invalidate(self, key: Key, min_version: int) -> None:
        """Everything below `min_version` is stale from now on."""
        if self._data is None:
            return
        ikey = _ints(key)
        current = self._data.get(ikey)
        if current is None or current.version < min_version:
            self._data[ikey] = Entry(min_version, None)

    def entry(self, key: Key) -> Entry | None:
        return self._data.get(_ints(key)) if self._data is not None else None

    def drop(self, key: Key) -> None:
        if self._data is not None:
            self._data.pop(_ints(key))

    def clear(self) -> None:
        if self._data is not None:
            self._data.clear()


def _ints(key: Key) -> tuple[int, int]:
    return key[0].int, key[1].int
