"""When this process may serve from its caches: leases that a writer's failure path outlasts.

"After a write returns, a Get on any process returns that version or a newer one" must hold when
Redis is frozen (sockets open, no answers), not only when it is down. A process therefore trusts
a cache tier only while it holds *proof* that it has not missed an invalidation:

* **L1** needs two leases. The bus's: a PING sent on the subscription socket at time t and
  answered proves every invalidation Redis published before it reached the process first (one
  socket, in order), so L1 may be trusted until t + lease. And the repairs' (cache/repairs.py): a
  poll of PostgreSQL's pending cache repairs started at time t proves the process has dropped
  every entry a failed writer recorded before t, so until t + lease.
* **L2** needs the repairs' lease, and no repair pending: a writer that could not write Redis
  recorded what Redis lacks, in PostgreSQL, before it answered.

A writer whose invalidation was not confirmed (Redis failed or timed out, or a process did not
acknowledge) records the repair and then waits one lease before it answers: by then every process
has either seen the repair (and dropped the old version) or stopped trusting its caches. Any
confirmation that comes later cannot make an old copy trusted again, because each lease starts
from the moment its proof was asked for, not when the answer arrived.

The happy path pays nothing for this but a clock read per cache hit, a PING on the subscription
every ping interval and one small query per repair poll; a write during a Redis outage pays one
lease (AGENTSTORE_CACHE_LEASE_SECONDS, 1 s) of latency. The lease is long enough that an event
loop stalled for most of a second under load does not lose its caches (and with them more load).
"""

from __future__ import annotations

import asyncio
import time


class CacheTrust:
    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._ping_until = 0.0
        self._poll_until = 0.0
        self._l2_clean = False
        # time.monotonic() values before which a tier may be served; read on every cache hit.
        self.l1_until = 0.0
        self.l2_until = 0.0

    def pong(self, sent_at: float) -> None:
        """A PING sent at `sent_at` (time.monotonic()) on the subscription was answered."""
        if sent_at + self.lease > self._ping_until:
            self._ping_until = sent_at + self.lease
            self._update()

    def unsubscribed(self) -> None:
        """The subscription is gone: whatever was published meanwhile is lost to this process."""
        self._ping_until = 0.0
        self._update()

    def polled(self, started_at: float, l2_clean: bool) -> None:
        """A poll of the pending repairs started at `started_at` was applied; `l2_clean`: none
        remains pending."""
        self._poll_until = max(self._poll_until, started_at + self.lease)
        self._l2_clean = l2_clean
        self._update()

    def repairs_pending(self) -> None:
        """This process knows of a repair Redis has not taken yet: L2 is not to be trusted."""
        self._l2_clean = False
        self._update()

    def _update(self) -> None:
        self.l1_until = min(self._ping_until, self._poll_until)
        self.l2_until = self._poll_until if self._l2_clean else 0.0

    def l1(self) -> bool:
        return time.monotonic() < self.l1_until

    def l2(self) -> bool:
        return time.monotonic() < self.l2_until

    async def outlast(self, since: float | None = None) -> None:
        """Wait until one lease past `since` (time.monotonic(); default now): a lease that could
        still cover an old copy was granted before `since`, so none is left afterwards."""
        start = time.monotonic() if since is None else since
        await asyncio.sleep(max(0.0, start + self.lease - time.monotonic()))
