"""Read-through caching of one entity kind: L1, then L2, then PostgreSQL, never stale after a write.

Reads: L1 (only while the invalidation bus is subscribed) → L2 (while Redis is available) → a
single-flight load from PostgreSQL, whose result fills both tiers only if nothing newer is known.
Writes (after commit): L2 is replaced by the new version (or a tombstone) and the invalidation is
published in the same Redis round trip; this process's L1 takes the new bytes directly.

An entity with a lifetime of its own (a session) passes `expires`: a cached copy whose instant has
passed is a miss in either tier, checked to the microsecond on every hit, so the loader
(PostgreSQL) decides. Its L2 entry stays until that instant or for the cache TTL, whichever is
later: past the entity's end it still holds the version, so a reader that loaded an older version
(with a later end) before a write that shortened the lifetime cannot put that older copy back.

Why the set-if-newer check holds: every L2 entry lives at least the cache TTL from its write, and
a reader's database read precedes any write it missed. A fill therefore always meets the newer
entry, unless more than the TTL passed between its read and its fill; such fills are dropped (at
half the TTL, for margin). This assumes Redis does not evict entries early (`maxmemory-policy
noeviction`, or enough memory).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agentstore import metrics
from agentstore.cache.l1 import Key, L1Cache
from agentstore.cache.l2 import L2Cache
from agentstore.cache.repairs import CacheRepairs, Repair, RepairHandler
from agentstore.cache.trust import CacheTrust
from agentstore.context import cache_bypassed
from agentstore.db.coalesce import PointReads
from agentstore.flight import Flight
from agentstore.redis import REDIS_ERRORS
from agentstore.redis.bus import ProcessBus, Subscriber
from agentstore.redis.circuit import RedisCircuit

log = logging.getLogger(__name__)

# (version, wire bytes) of one row, or None when there is no such row.
Loaded = tuple[int, bytes] | None
# The Unix time in microseconds at which cached wire bytes stop being valid; None: no end of their own.
Expiry = Callable[[bytes], int | None]
# The point reads behind the cache: (version, wire bytes) of the tenant's rows among the ids.
LoadMany = Callable[[uuid.UUID, list[uuid.UUID]], Awaitable[dict[uuid.UUID, tuple[int, bytes]]]]
# A written row → (version, wire bytes, Unix µs when they stop being valid or None).
Encode = Callable[[Any], tuple[int, bytes, int | None]]


def _now_us() -> int:
    return time.time_ns() // 1000


class EntityCache:
    def __init__(
        self,
        kind: str,
        l1: L1Cache,
        l2: L2Cache,
        bus: ProcessBus,
        circuit: RedisCircuit,
        repairs: CacheRepairs,
        trust: CacheTrust,
        key_prefix: str,
        load_many: LoadMany,
        encode: Encode,
        expires: Expiry | None = None,
        missing: Callable[[uuid.UUID], Exception] | None = None,
    ) -> None:
        self.kind = kind
        # What `require` raises for an entity that does not exist (e.g. NOT_FOUND AGENT_NOT_FOUND).
        self._missing = missing or (lambda entity_id: LookupError(f"no {kind} {entity_id}"))
        self._load_many = load_many
        # Single reads of one tenant that miss both tiers at once share one query.
        self._point_reads: PointReads[tuple[int, bytes]] = PointReads(load_many)
        self._encode = encode
        self._expires = expires
        self._l1 = l1
        self._l2 = l2
        self._bus = bus
        self._circuit = circuit
        self._repairs = repairs
        self._trust = trust
        self._prefix = f"{key_prefix}c:{kind}:"
        # Flights by L2 key: a str hashes in C, a pair of UUIDs in Python (twice per dict operation).
        self._inflight: dict[str, Flight[Loaded]] = {}
        # Test hook: awaited between a database read and the cache fill (forces the stale-set race).
        self.before_fill: Callable[[Key], Awaitable[None]] | None = None
        bus.subscribe(kind, Subscriber(on_message=self._on_invalidation, on_resync=l1.clear))
        repairs.handle(kind, RepairHandler(local=self._repaired_locally, redis=self._repair_l2, forget_all=l1.clear))
        self._hits_l1 = metrics.CACHE_HITS.labels(kind, "l1")
        self._hits_l2 = metrics.CACHE_HITS.labels(kind, "l2")
        self._misses_l1 = metrics.CACHE_MISSES.labels(kind, "l1")
        self._misses_l2 = metrics.CACHE_MISSES.labels(kind, "l2")

    def l2_key(self, key: Key) -> str:
        return f"{self._prefix}{key[0]}:{key[1]}"

    def _l1_usable(self) -> bool:
        # Only under the leases of cache/trust.py: a writer that could not confirm its
        # invalidation outlasts them before it answers.
        return self._l1.enabled and time.monotonic() < self._trust.l1_until

    def _l2_usable(self) -> bool:
        return self._l2.enabled and self._circuit.available and time.monotonic() < self._trust.l2_until

    def _live(self, payload: bytes) -> bool:
        """Whether cached bytes may still be served (always, without `expires`)."""
        if self._expires is None:
            return True
        end = self._expires(payload)
        return end is None or end > _now_us()

    def _expire_at_ms(self, payload: bytes | None, expires_us: int | None) -> int | None:
        """The L2 PXAT of an entry with an end of its own: that end or a cache TTL from now,
        whichever is later (the module docstring says why); None for the cache TTL alone."""
        if expires_us is None and payload is not None and self._expires is not None:
            expires_us = self._expires(payload)
        if expires_us is None:
            return None
        return max(expires_us // 1000, _now_us() // 1000 + self._l2.ttl_ms)

    def cached(self, key: Key) -> bytes | None:
        """L1's bytes of the entity if they may be served (counted as an L1 hit), else None.

        A plain function, so that an L1 hit costs no coroutine; on None the caller awaits `get`
        (which looks at L1 again and counts the miss), or calls `get` right away. Never a hit for a
        request with `cache-control: no-cache`.
        """
        if self._l1_usable() and not cache_bypassed():
            payload = self._l1.get(key)
            if payload is not None and self._live(payload):
                self._hits_l1.inc()
                return payload
        return None

    async def get(self, key: Key) -> bytes | None:
        """The entity's wire bytes, or None when it does not exist.

        With `cache-control: no-cache` on the request, PostgreSQL answers and no tier is touched.
        """
        payload = self.cached(key)
        if payload is not None:
            return payload
        if cache_bypassed():
            loaded = await self._point_reads.get(key[0], key[1])
        else:
            if self._l1_usable():
                self._misses_l1.inc()
            loaded = await self._load_once(key)
        return loaded[1] if loaded is not None else None

    async def require(self, key: Key) -> bytes:
        """As `get`, raising the kind's not-found error where there is no such entity. Call it when
        `cached` answered None: `cache.cached(key) or await cache.require(key)`."""
        payload = await self.get(key)
        if payload is None:
            raise self._missing(key[1])
        return payload

    async def _load_once(self, key: Key) -> Loaded:
        """Single-flight over L2 and PostgreSQL: concurrent L1 misses of one key share one lookup.

        The lookup is a Flight: it runs in a task of its own, so a caller that gives up (cancelled,
        or out of deadline) leaves the others their result. It ends only after the fill, so a
        caller arriving later finds the entry in L1 or L2 and never repeats the query.
        """
        l2_key = self.l2_key(key)
        flight = self._inflight.get(l2_key)
        if flight is None or not flight.joinable:
            flight = Flight(functools.partial(self._lookup, key, l2_key))
            self._inflight[l2_key] = flight
            flight.add_done_callback(functools.partial(self._landed, l2_key, flight))
        return await flight.join()

    async def _lookup(self, key: Key, l2_key: str) -> Loaded:
        loaded = await self._from_l2(key, l2_key)
        if loaded is None:
            read_at = time.monotonic()
            loaded = await self._point_reads.get(key[0], key[1])
            if loaded is not None:
                await self._fill(key, loaded[0], loaded[1], read_at)
        return loaded

    def _landed(self, l2_key: str, flight: Flight[Loaded]) -> None:
        if self._inflight.get(l2_key) is flight:
            del self._inflight[l2_key]

    def waiting(self, key: Key) -> int:
        """Callers waiting on the load of `key` in this process (for tests and introspection)."""
        flight = self._inflight.get(self.l2_key(key))
        return flight.waiting if flight is not None else 0

    async def _from_l2(self, key: Key, l2_key: str) -> tuple[int, bytes] | None:
        if not self._l2_usable():
            return None
        try:
            entry = await self._l2.get(l2_key)
        except REDIS_ERRORS as exc:
            self._circuit.failed(exc)
            return None
        if entry is None or entry.payload is None or not self._live(entry.payload):
            self._misses_l2.inc()
            return None
        self._hits_l2.inc()
        if self._l1_usable():
            self._l1.put_if_newer(key, entry.version, entry.payload)
        return entry.version, entry.payload

    async def _fill(self, key: Key, version: int, payload: bytes, read_at: float) -> None:
        await self._fill_many([(key, version, payload)], read_at)

    async def _fill_many(self, rows: list[tuple[Key, int, bytes]], read_at: float) -> None:
        """Put rows read at `read_at` (time.monotonic()) into both tiers, each unless something
        newer is known; one Redis round trip for all of them."""
        hook = self.before_fill
        if hook is not None:
            for key, _, _ in rows:
                await hook(key)
        rows = [row for row in rows if self._live(row[2])]  # already over: nothing to cache
        if not rows:
            return
        if self._l2.enabled and (time.monotonic() - read_at) * 1000 >= self._l2.ttl_ms / 2:
            # Too old to prove against L2: a newer entry written after the read may be gone by now.
            metrics.CACHE_STALE_SETS_REJECTED.labels(self.kind, "l2").inc(len(rows))
            return
        applied = [True] * len(rows)
        if self._l2_usable():
            try:
                applied = await self._l2.set_many_if_newer(
                    [
                        (self.l2_key(key), version, payload, self._expire_at_ms(payload, None))
                        for key, version, payload in rows
                    ]
                )
            except REDIS_ERRORS as exc:
                self._circuit.failed(exc)
        l1 = self._l1_usable()
        for (key, version, payload), ok in zip(rows, applied, strict=True):
            if not ok:
                metrics.CACHE_STALE_SETS_REJECTED.labels(self.kind, "l2").inc()
                # L2 knows something newer: do not trust our copy for L1 either.
            elif l1 and not self._l1.put_if_newer(key, version, payload):
                metrics.CACHE_STALE_SETS_REJECTED.labels(self.kind, "l1").inc()

    async def get_many(self, tenant: uuid.UUID, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        """Wire bytes of the ids that exist; one MGET and one query for everything L1 lacks."""
        if cache_bypassed():
            return {i: value[1] for i, value in (await self._load_many(tenant, list(ids))).items()}
        found: dict[uuid.UUID, bytes] = {}
        missing: list[Key] = []
        l1 = self._l1_usable()
        for entity_id in ids:
            key = (tenant, entity_id)
            payload = self._l1.get(key) if l1 else None
            if payload is not None and self._live(payload):
                self._hits_l1.inc()
                found[entity_id] = payload
            else:
                if l1:
                    self._misses_l1.inc()
                missing.append(key)
        if missing and self._l2_usable():
            try:
                entries = await self._l2.get_many([self.l2_key(k) for k in missing])
            except REDIS_ERRORS as exc:
                self._circuit.failed(exc)
            else:
                still: list[Key] = []
                for key, entry in zip(missing, entries, strict=True):
                    if entry is not None and entry.payload is not None and self._live(entry.payload):
                        self._hits_l2.inc()
                        found[key[1]] = entry.payload
                        if l1:
                            self._l1.put_if_newer(key, entry.version, entry.payload)
                    else:
                        self._misses_l2.inc()
                        still.append(key)
                missing = still
        if missing:
            read_at = time.monotonic()
            loaded = await self._load_many(tenant, [key[1] for key in missing])
            for entity_id, (_, payload) in loaded.items():
                found[entity_id] = payload
            if loaded:
                await self._fill_many(
                    [((tenant, entity_id), version, payload) for entity_id, (version, payload) in loaded.items()],
                    read_at,
                )
        return found

    async def written(self, tenant: uuid.UUID, row: Any) -> bytes:
        """After commit: the row's wire bytes (the RPC's response), now in both tiers of every
        process. The row is encoded once: the response and the cache get the same bytes."""
        version, payload, expires_us = self._encode(row)
        await self._replaced((tenant, row["id"]), version, payload, expires_us)
        return payload

    async def deleted(self, key: Key, version: int, *, expires_us: int | None = None) -> None:
        """After commit: the entity at `version` is gone. A tombstone one version past it stays
        (until `expires_us`, if later than the cache TTL), so no reader can put the old row back."""
        await self._replaced(key, version + 1, None, expires_us)

    async def _replaced(self, key: Key, version: int, payload: bytes | None, expires_us: int | None) -> None:
        # A flight that started before the commit may carry the old row: later readers must not join it.
        l2_key = self.l2_key(key)
        self._inflight.pop(l2_key, None)
        if payload is not None and self._l1.enabled:
            self._l1.put_if_newer(key, version, payload)
        else:
            self._l1.invalidate(key, version)
        repair = Repair(self.kind, key[0], key[1], version)
        if not self._circuit.available:
            await self._unconfirmed(repair if self._l2.enabled else None)
            return
        sequence, message = self._bus.envelope(self.kind, f"{key[0]}:{key[1]}:{version}")
        try:
            if self._l2.enabled:
                _, receivers = await self._l2.set_if_newer(
                    l2_key,
                    version,
                    payload,
                    channel=self._bus.channel,
                    message=message,
                    expire_at_ms=self._expire_at_ms(payload, expires_us),
                )
            else:
                receivers = await self._bus.publish_envelope(message)
        except REDIS_ERRORS as exc:
            self._bus.forget(sequence)
            self._circuit.failed(exc)
            await self._unconfirmed(repair if self._l2.enabled else None)
            return
        published = time.monotonic()
        metrics.CACHE_INVALIDATIONS_SENT.inc()
        # Read-your-writes in every process: return only once they all dropped the old version,
        # or could no longer trust it. A process that has not acknowledged renews its L1 lease only
        # from PINGs Redis answers after the invalidation, which it applies first: so its lease on
        # the old version ends at most a lease after the publish.
        if not await self._bus.acknowledged(sequence, receivers):
            metrics.CACHE_UNCONFIRMED_WRITES.labels(self.kind).inc()
            await self._trust.outlast(since=published)

    async def _unconfirmed(self, repair: Repair | None) -> None:
        """The invalidation may not have reached every process (and L2 may hold the old version):
        record the repair in PostgreSQL, then outlast every process's cache lease (cache/trust.py)."""
        metrics.CACHE_UNCONFIRMED_WRITES.labels(self.kind).inc()
        if repair is not None:
            await self._repairs.record(repair)
        await self._trust.outlast()

    def _repaired_locally(self, repairs: Sequence[Repair]) -> None:
        for repair in repairs:
            if repair.entity_id is not None and repair.version is not None:
                key = (repair.tenant_id, repair.entity_id)
                self._l1.invalidate(key, repair.version)
                self._inflight.pop(self.l2_key(key), None)

    async def _repair_l2(self, repairs: Sequence[Repair]) -> None:
        """A tombstone at each repair's version: older copies are refused, and it reads as a miss."""
        entries = [
            (self.l2_key((r.tenant_id, r.entity_id)), r.version, None, None)
            for r in repairs
            if r.entity_id is not None and r.version is not None
        ]
        if entries and self._l2.enabled:
            await self._l2.set_many_if_newer(entries)

    async def forget(self, key: Key) -> None:
        """Drop a key from this process's L1 and from L2 (a cold read follows)."""
        self._l1.drop(key)
        await self._l2.delete([self.l2_key(key)])

    async def peek(self, key: Key) -> tuple[int | None, int | None]:
        """Versions cached for a key in (L1, L2); None where a tier holds no payload for it."""
        l1_entry = self._l1.entry(key)
        l2_entry = await self._l2.get(self.l2_key(key))
        return (
            l1_entry.version if l1_entry is not None and l1_entry.payload is not None else None,
            l2_entry.version if l2_entry is not None and l2_entry.payload is not None else None,
        )

    def _on_invalidation(self, key: str) -> None:
        tenant, _, rest = key.partition(":")
        entity, _, version = rest.partition(":")
        try:
            parsed = (uuid.UUID(tenant), uuid.UUID(entity))
            self._l1.invalidate(parsed, int(version))
            self._inflight.pop(self.l2_key(parsed), None)
        except ValueError:
            log.warning("malformed invalidation ignored", extra={"kind": self.kind})
