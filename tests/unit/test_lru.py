"""TtlLru: the bounded, expiring map behind L1 and the API key cache."""

from __future__ import annotations

import pytest

from agentstore.cache.lru import TtlLru


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_ttl_after_they_were_set() -> None:
    clock = Clock()
    cache: TtlLru[str, int] = TtlLru(10, 5, clock)
    cache["a"] = 1
    clock.now += 4.9
    assert cache.get("a") == 1  # a read does not extend the lifetime
    clock.now += 0.1
    assert cache.get("a") is None
    assert len(cache) == 0


def test_setting_again_restarts_the_lifetime() -> None:
    clock = Clock()
    cache: TtlLru[str, int] = TtlLru(10, 5, clock)
    cache["a"] = 1
    clock.now += 4
    cache["a"] = 2
    clock.now += 4
    assert cache.get("a") == 2


def test_the_least_recently_used_entry_is_evicted() -> None:
    cache: TtlLru[str, int] = TtlLru(2, 60, Clock())
    cache["a"] = 1
    cache["b"] = 2
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache["c"] = 3
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert len(cache) == 2


def test_expired_entries_leave_when_something_is_set() -> None:
    clock = Clock()
    cache: TtlLru[str, int] = TtlLru(10, 5, clock)
    cache["a"] = 1
    clock.now += 3
    cache["b"] = 2
    clock.now += 3
    cache["c"] = 3
    assert list(cache._data) == ["b", "c"]


def test_pop_items_and_clear() -> None:
    clock = Clock()
    cache: TtlLru[str, int] = TtlLru(10, 5, clock)
    cache["a"] = 1
    cache["b"] = 2
    assert sorted(cache.items()) == [("a", 1), ("b", 2)]
    assert cache.pop("a") == 1
    assert cache.pop("a") is None
    clock.now += 5
    assert cache.items() == []
    assert cache.pop("b") is None  # expired: gone, and not returned
    cache["c"] = 3
    cache.clear()
    assert cache.get("c") is None


@pytest.mark.parametrize(("maxsize", "ttl"), [(0, 5), (10, 0)])
def test_rejects_a_cache_that_could_hold_nothing(maxsize: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        TtlLru(maxsize, ttl)
