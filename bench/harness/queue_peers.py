"""The PostgreSQL job queues a user would pick instead of agentstore's, measured in the same run.

Each peer runs as one process of its own (pinned like the servers), against the same PostgreSQL
as agentstore, in a scratch database of its own that is dropped afterwards, with the workload of
agentstore's task scenarios: claim -> complete with WORKERS workers and a no-op handler (as
claim_complete: 8 agents, one cycle in flight each), and bulk insert of 1,000 rows per call with
4 calls in flight (as batch_create_tasks). Each peer's driver (bench/queue_peers/graphile.mjs,
harness/procrastinate_peer.py) prints one JSON line. A peer that is not installed is reported as
skipped with the reason, never left out.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
import psutil

from harness.environment import BENCH_DIR, replace_dsn

WORKERS = 8
BATCH = 1000
INFLIGHT = 4
NODE_DIR = BENCH_DIR / "queue_peers"


@dataclass(frozen=True)
class Peer:
    name: str  # as the table shows it
    key: str  # scratch database suffix
    # A generous guess of its claim -> complete jobs/s, to queue enough jobs for the whole run.
    rate_guess: float

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        if self.key == "graphile":
            if shutil.which("node") is None:
                return "node not found (Graphile Worker is a Node.js library)"
            if not (NODE_DIR / "node_modules" / "graphile-worker" / "package.json").is_file():
                return "graphile-worker not installed: `make bench-peers` (npm ci in bench/queue_peers)"
            return None
        if importlib.util.find_spec("procrastinate") is None:
            return "procrastinate not installed in the bench environment: `make bench-venv`"
        return None

    def command(self, config: dict[str, Any]) -> list[str]:
        if self.key == "graphile":
            return [shutil.which("node") or "node", str(NODE_DIR / "graphile.mjs"), json.dumps(config)]
        return [sys.executable, "-m", "harness.procrastinate_peer", json.dumps(config)]


PEERS = (
    Peer("Graphile Worker", "graphile", rate_guess=6000.0),
    Peer("Procrastinate", "procrastinate", rate_guess=1000.0),
)


@dataclass
class PeerResult:
    name: str
    status: str  # ok | skipped | error
    version: str | None = None
    reason: str | None = None
    claim_jobs_per_s: float | None = None
    bulk_rows_per_s: float | None = None
    drained_early: bool = False
    # Over the peer's whole run (100 = one core): the peer's process, every PostgreSQL process, and
    # the rest of the machine, i.e. other work: noise, as in the scenario tables' "other CPU %".
    cpu_percent: float | None = None
    db_cpu_percent: float | None = None
    other_cpu_percent: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CpuWindow:
    """CPU used while a child process runs: the child (once reaped), PostgreSQL, and everything else."""

    def __init__(self) -> None:
        self._postgres = [p for p in psutil.process_iter(["name"]) if p.info.get("name") in ("postgres", "postmaster")]
        self._t0 = time.perf_counter()
        self._host0 = self._host_busy()
        self._children0 = self._children()
        self._db0 = self._db()

    @staticmethod
    def _host_busy() -> float:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def _db(self) -> float:
        total = 0.0
        for proc in self._postgres:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def stop(self, result: PeerResult) -> None:
        elapsed = time.perf_counter() - self._t0
        if elapsed <= 0:
            return
        child = self._children() - self._children0
        db = self._db() - self._db0
        host = self._host_busy() - self._host0
        result.cpu_percent = child / elapsed * 100
        result.db_cpu_percent = db / elapsed * 100
        result.other_cpu_percent = max(0.0, host - child - db) / elapsed * 100


def prefill_for(peer: Peer, warmup: float, duration: float) -> int:
    """Jobs to queue before the workers start: enough for warm-up and run at 1.5x the guessed rate."""
    wanted = max(2000.0, peer.rate_guess * (warmup + duration) * 1.5)
    return math.ceil(wanted / BATCH) * BATCH


async def run_peer(
    peer: Peer, admin_url: str, tag: str, *, duration: float, warmup: float, prefix: Sequence[str]
) -> PeerResult:
    """One peer in a scratch database of its own; never raises for the peer's own failures."""
    reason = peer.unavailable()
    if reason is not None:
        return PeerResult(peer.name, "skipped", reason=reason)
    database = f"agentstore_bench_{tag}_{peer.key}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    config = {
        "databaseUrl": replace_dsn(admin_url, database=database),
        "duration": duration,
        "warmup": warmup,
        "workers": WORKERS,
        "batch": BATCH,
        "inflight": INFLIGHT,
        "prefill": prefill_for(peer, warmup, duration),
    }
    window = CpuWindow()
    try:
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            *peer.command(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 2 * (warmup + duration) + 300)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        lines = out.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = err.decode(errors="replace").strip()[-600:]
            return PeerResult(peer.name, "error", reason=f"exit {proc.returncode}: {tail}")
        doc = json.loads(lines[-1])
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
    result = PeerResult(
        peer.name,
        "ok",
        version=doc["version"],
        claim_jobs_per_s=doc["claim_complete"]["jobs_per_s"],
        bulk_rows_per_s=doc["bulk_insert"]["rows_per_s"],
        drained_early=bool(doc["claim_complete"]["drained_early"]),
        raw=doc,
    )
    window.stop(result)
    return result
