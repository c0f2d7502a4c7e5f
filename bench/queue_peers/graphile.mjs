// Graphile Worker measured the way bench/harness/queue_peers.py measures every queue peer.
//
//   node graphile.mjs '{"databaseUrl": "...", "duration": 10, "warmup": 1, "workers": 8,
//                       "batch": 1000, "inflight": 4, "prefill": 100000}'
//
// 1. claim -> complete: `prefill` no-op jobs added (addJobs, chunks of `batch`), then
//    run({concurrency: workers}) in this process; after `warmup` seconds, jobs/s is the drop in
//    the job count over `duration` seconds (Graphile deletes a job when it completes), polled
//    every 250 ms, stopping early if the queue runs dry.
// 2. bulk insert: `inflight` loops of addJobs(`batch` jobs) for warmup + duration seconds;
//    rows/s = batch x the calls that completed inside the measured window.
// Prints one JSON line on stdout; anything else goes to stderr.
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import { createRequire } from "node:module";
import pg from "pg";

const cfg = JSON.parse(process.argv[2]);
const version = createRequire(import.meta.url)("graphile-worker/package.json").version;
// Quiet: Graphile logs every job at info level otherwise.
const logger = new Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => performance.now() / 1000;

function chunk(n, start) {
  const jobs = [];
  for (let i = 0; i < n; i++) jobs.push({ identifier: "noop", payload: { n: start + i, kind: "bench" } });
  return jobs;
}

async function claimComplete(utils, pool) {
  for (let added = 0; added < cfg.prefill; added += cfg.batch) {
    await utils.addJobs(chunk(Math.min(cfg.batch, cfg.prefill - added), added));
  }
  const remaining = async () =>
    Number((await pool.query("select count(*) as n from graphile_worker._private_jobs")).rows[0].n);
  const runner = await run({
    pgPool: pool,
    concurrency: cfg.workers,
    noHandleSignals: true,
    logger,
    taskList: { noop: async () => {} },
  });
  try {
    await sleep(cfg.warmup * 1000);
    const r0 = await remaining();
    const t0 = now();
    let r1 = r0;
    let t1 = t0;
    while (t1 - t0 < cfg.duration && r1 > 0) {
      await sleep(250);
      r1 = await remaining();
      t1 = now();
    }
    return {
      jobs: r0 - r1,
      seconds: t1 - t0,
      jobs_per_s: (r0 - r1) / (t1 - t0),
      prefilled: cfg.prefill,
      remaining_at_start: r0,
      drained_early: r1 === 0,
    };
  } finally {
    await runner.stop();
  }
}

async function bulkInsert(utils) {
  const start = now();
  const windowStart = start + cfg.warmup;
  const end = windowStart + cfg.duration;
  let calls = 0;
  let next = 0;
  async function loop() {
    while (now() < end) {
      const jobs = chunk(cfg.batch, next);
      next += cfg.batch;
      await utils.addJobs(jobs);
      const t = now();
      if (t >= windowStart && t <= end) calls += 1;
    }
  }
  await Promise.all(Array.from({ length: cfg.inflight }, loop));
  return { calls, rows: calls * cfg.batch, seconds: cfg.duration, rows_per_s: (calls * cfg.batch) / cfg.duration };
}

const pool = new pg.Pool({ connectionString: cfg.databaseUrl, max: cfg.workers + cfg.inflight + 2 });
const utils = await makeWorkerUtils({ pgPool: pool, logger });
try {
  await utils.migrate();
  const claim = await claimComplete(utils, pool);
  const bulk = await bulkInsert(utils);
  console.log(JSON.stringify({ name: "graphile-worker", version, claim_complete: claim, bulk_insert: bulk }));
} finally {
  await utils.release();
  await pool.end();
}
