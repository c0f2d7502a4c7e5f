"""Procrastinate measured the way harness.queue_peers measures every queue peer (see graphile.mjs too).

    python -m harness.procrastinate_peer '{"databaseUrl": "...", "duration": 10, "warmup": 1,
                                           "workers": 8, "batch": 1000, "inflight": 4, "prefill": 20000}'

1. claim -> complete: `prefill` no-op jobs deferred (batch_defer_async, chunks of `batch`), then
   run_worker_async(concurrency=workers) in this process; after `warmup` seconds, jobs/s is the
   growth of the succeeded count over `duration` seconds (Procrastinate keeps finished jobs),
   polled every 250 ms, stopping early if the queue runs dry.
2. bulk insert: `inflight` concurrent loops of batch_defer_async(`batch` jobs) for warmup +
   duration seconds; rows/s = batch x the calls that completed inside the measured window.

Prints one JSON line on stdout. A separate process, so the harness can pin it like a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from importlib.metadata import version
from typing import Any

import procrastinate
import psycopg

SUCCEEDED = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
TODO = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"


def chunk(n: int, start: int) -> list[dict[str, Any]]:
    return [{"n": start + i, "kind": "bench"} for i in range(n)]


async def claim_complete(app: procrastinate.App, noop: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    for added in range(0, cfg["prefill"], cfg["batch"]):
        await noop.batch_defer_async(*chunk(min(cfg["batch"], cfg["prefill"] - added), added))
    async with await psycopg.AsyncConnection.connect(cfg["databaseUrl"], autocommit=True) as con:

        async def count(sql: str) -> int:
            row = await (await con.execute(sql)).fetchone()
            assert row is not None
            return int(row[0])

        worker = asyncio.create_task(
            app.run_worker_async(concurrency=cfg["workers"], install_signal_handlers=False, wait=True)
        )
        try:
            await asyncio.sleep(cfg["warmup"])
            done0, t0 = await count(SUCCEEDED), time.perf_counter()
            done1, t1, todo = done0, t0, 1
            while t1 - t0 < cfg["duration"] and todo > 0:
                await asyncio.sleep(0.25)
                done1, todo, t1 = await count(SUCCEEDED), await count(TODO), time.perf_counter()
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
    return {
        "jobs": done1 - done0,
        "seconds": t1 - t0,
        "jobs_per_s": (done1 - done0) / (t1 - t0),
        "prefilled": cfg["prefill"],
        "drained_early": todo == 0,
    }


async def bulk_insert(noop: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    window_start, end = start + cfg["warmup"], start + cfg["warmup"] + cfg["duration"]
    calls = 0
    first = 0

    async def loop() -> None:
        nonlocal calls, first
        while time.perf_counter() < end:
            jobs = chunk(cfg["batch"], first)
            first += cfg["batch"]
            await noop.batch_defer_async(*jobs)
            if window_start <= time.perf_counter() <= end:
                calls += 1

    await asyncio.gather(*(loop() for _ in range(cfg["inflight"])))
    rows = calls * cfg["batch"]
    return {"calls": calls, "rows": rows, "seconds": cfg["duration"], "rows_per_s": rows / cfg["duration"]}


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    connector = procrastinate.PsycopgConnector(
        conninfo=cfg["databaseUrl"], min_size=1, max_size=cfg["workers"] + cfg["inflight"] + 2
    )
    app = procrastinate.App(connector=connector)

    @app.task(name="noop")
    async def noop(**_: Any) -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        claim = await claim_complete(app, noop, cfg)
        bulk = await bulk_insert(noop, cfg)
    return {"name": "procrastinate", "version": version("procrastinate"), "claim_complete": claim, "bulk_insert": bulk}


if __name__ == "__main__":
    try:
        import uvloop

        result = uvloop.run(main(json.loads(sys.argv[1])))
    except ImportError:
        result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
