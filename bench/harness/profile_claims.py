"""Where one claim_complete cycle goes: server CPU, statements, PostgreSQL time, Redis commands.

    make bench-profile-claims                 (= bench/.venv/bin/python -m harness.profile_claims)
    bench/.venv/bin/python -m harness.profile_claims --duration 20 --out /tmp/claims-profile

Starts a PostgreSQL cluster and a Redis of its own (free ports, a temporary directory, stopped
again by PID): pg_stat_statements, track_io_timing and track_wal_io_timing on, every other setting
as initdb leaves it (fsync and synchronous_commit on), so the numbers are agentstore's alone, not
those of whatever else the machine's shared servers run. Then the claim_complete scenario, as
`make bench` runs it, and over its warm-up + measured window:

- py-spy (`record --format raw`) of the `agentstore serve` process: where its CPU goes;
- statements per RPC, from the server's own agentstore_db_statements_total;
- pg_stat_statements: calls, and execution time per statement, per cycle;
- pg_stat_wal: WAL syncs and their time per cycle (every transaction's COMMIT waits for one);
- Redis commands per cycle (INFO commandstats) and cache invalidations sent/received;
- CPU per cycle of the server, of PostgreSQL (this cluster's processes) and of Redis.

Prints the breakdown, writes it as JSON, and keeps the py-spy stacks (flamegraph.pl input).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import redis

from harness.environment import free_port
from harness.options import parse_options
from harness.pyload import Workload
from harness.runner import Bench, Server, log
from harness.stats import Measurement

PG_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "'all'",
    "pg_stat_statements.max": "5000",
    "track_io_timing": "on",
    "track_wal_io_timing": "on",
    "max_connections": "100",
}
TOP_STATEMENTS = 15
TOP_FRAMES = 30


# ------------------------------------------------------------------------------ own servers


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


def as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: then its tools run as the postgres system user.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def own_postgres(workdir: Path) -> Iterator[tuple[str, psutil.Process]]:
    """A scratch cluster with pg_stat_statements; yields its superuser URL and its postmaster."""
    data = workdir / "pg"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(data, "postgres")
    binary = pg_bin()
    subprocess.run(
        as_postgres([str(binary / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    settings = {**PG_SETTINGS, "port": str(port), "unix_socket_directories": f"'{data}'"}
    with (data / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
    subprocess.run(
        as_postgres([str(binary / "pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    postmaster = psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        # Its views and functions live where the extension is created; it sees every database.
        subprocess.run(
            [str(binary / "psql"), url, "-qc", "CREATE EXTENSION pg_stat_statements"], check=True, capture_output=True
        )
        yield url, postmaster
    finally:
        subprocess.run(
            as_postgres([str(binary / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )


@contextlib.contextmanager
def own_redis(workdir: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(root: psutil.Process) -> float:
    """CPU of a server and its children (PostgreSQL's backends), alive ones only."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


# ------------------------------------------------------------------------------ the breakdown

STATEMENTS = """
SELECT s.query, s.calls, s.total_exec_time, s.rows, s.shared_blks_hit, s.shared_blks_read, s.wal_records
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid
WHERE d.datname = $1 AND r.rolname = $2
ORDER BY s.total_exec_time DESC
"""
WAL = "SELECT wal_records, wal_bytes, wal_write, wal_sync, wal_write_time, wal_sync_time FROM pg_stat_wal"


def redis_commands(url: str) -> Counter[str]:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def collapse_stacks(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """py-spy raw output (`root;...;leaf count`): inclusive and leaf samples per frame, and the total."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [f for f in stack.split(";") if f]
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            leaf[frames[-1]] += count
    return inclusive, leaf, total


def frame_path(frame: str) -> str:
    return frame.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]


def short_frame(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`: lines differ, functions add up."""
    path = frame_path(frame)
    marker = next((m for m in ("agentstore/", "site-packages/", "lib/python3") if m in path), None)
    return f"{frame.partition(' (')[0]} ({path.split(marker, 1)[1] if marker else path})"


# Where the leaf frame of a sample lives, most specific first: the server's CPU by component.
LEAF_OWNERS = (
    ("Thread.run (", "gRPC's poller thread (C core, no Python frame)"),
    ("Runner.run (", "event loop in C: uvloop and grpc.aio callbacks (no Python frame)"),
    ("run (uvloop", "event loop in C: uvloop and grpc.aio callbacks (no Python frame)"),
    ("asyncpg/", "asyncpg (statements: encode, send, decode)"),
    ("redis/", "redis-py (cache writes, invalidations)"),
    ("protobuf/", "protobuf (messages, JSON of audit rows)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("grpc/", "grpc (Python side)"),
)


def leaf_owner(frame: str) -> str:
    path = frame_path(frame)
    for marker, owner in LEAF_OWNERS:
        if frame.startswith(marker) or marker in path:
            return owner
    if "agentstore/" in path:
        return "agentstore/" + path.split("agentstore/", 1)[1]
    return "Python stdlib: " + path.rsplit("/", 1)[-1] if path else "other"


class ProfilingBench(Bench):
    """The claim_complete scenario, instrumented around the generator's run."""

    profile: dict[str, Any]
    postmaster: psutil.Process
    redis_process: psutil.Process
    out: Path
    rate: int

    async def measure_python(self, server: Server, workload: Workload, **kwargs: Any) -> Measurement:
        assert self.db is not None and self.backends is not None
        admin = await asyncpg.connect(self.backends.admin_url)
        try:
            await admin.execute("SELECT pg_stat_statements_reset()")
            await admin.execute("SELECT pg_stat_reset_shared('wal')")
        finally:
            await admin.close()
        commands0 = await asyncio.to_thread(redis_commands, self.backends.redis_url)
        pg0, redis0 = cpu_seconds(self.postmaster), cpu_seconds(self.redis_process)
        stacks = self.out / "py-spy-claim_complete.txt"
        seconds = math.ceil(self.opts.warmup + self.opts.duration)
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid", str(server.pid),
            "--rate", str(self.rate),
            "--duration", str(seconds),
            "--format", "raw",
            "--nonblocking",
            "--output", str(stacks),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        t0 = time.perf_counter()
        m = await super().measure_python(server, workload, **kwargs)
        elapsed = time.perf_counter() - t0
        pg_cpu, redis_cpu = cpu_seconds(self.postmaster) - pg0, cpu_seconds(self.redis_process) - redis0
        commands = await asyncio.to_thread(redis_commands, self.backends.redis_url)
        admin = await asyncpg.connect(self.backends.admin_url)
        try:
            statements = [dict(r) for r in await admin.fetch(STATEMENTS, self.db.name, self.db.role)]
            wal = dict(await admin.fetchrow(WAL))
        finally:
            await admin.close()
        _, err = await spy.communicate()
        if spy.returncode != 0:
            log(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")
        self.profile = {
            "measurement": m,
            "span_s": elapsed,
            "statements": statements,
            "wal": wal,
            "redis_commands": dict(commands - commands0),
            "pg_cpu_s": pg_cpu,
            "redis_cpu_s": redis_cpu,
            "stacks": stacks if stacks.exists() else None,
        }
        return m


def summarize(profile: dict[str, Any]) -> dict[str, Any]:
    """Everything per cycle, over the profiled span (warm-up + window: the counters cover both)."""
    m: Measurement = profile["measurement"]
    delta: dict[str, float] = m.extra.get("server_metrics_delta") or {}

    def metric(name: str, **labels: str) -> float:
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(v for k, v in delta.items() if k.startswith(name + "{") and all(w in k for w in want))

    cycles = sum(
        v
        for k, v in delta.items()
        if k.startswith("agentstore_rpc_total{") and "CompleteTask" in k and 'code="OK"' in k
    )
    per = 1 / cycles if cycles else 0.0

    def method(key: str) -> str:
        return key.split('method="', 1)[1].split('"', 1)[0].rsplit("/", 1)[-1] or "(background jobs)"

    statements_by_rpc = {method(k): v for k, v in delta.items() if k.startswith("agentstore_db_statements_total{")}
    rpcs = {method(k): v for k, v in delta.items() if k.startswith("agentstore_rpc_total{") and 'code="OK"' in k}
    statement_rows = []
    for s in profile["statements"][:TOP_STATEMENTS]:
        statement_rows.append(
            {
                "query": " ".join(s["query"].split())[:160],
                "calls_per_cycle": s["calls"] * per,
                "mean_ms": s["total_exec_time"] / s["calls"] if s["calls"] else 0.0,
                "ms_per_cycle": s["total_exec_time"] * per,
                "rows_per_call": s["rows"] / s["calls"] if s["calls"] else 0.0,
                "wal_records_per_cycle": s["wal_records"] * per,
            }
        )
    frames: list[dict[str, Any]] = []
    owners: list[dict[str, Any]] = []
    samples = 0
    if profile["stacks"] is not None:
        inclusive, leaves, samples = collapse_stacks(profile["stacks"])
        merged: Counter[str] = Counter()
        by_owner: Counter[str] = Counter()
        for frame, n in inclusive.items():
            merged[short_frame(frame)] = max(merged[short_frame(frame)], n)
        for frame, n in leaves.items():
            by_owner[leaf_owner(frame)] += n
        if samples:
            frames = [{"frame": f, "share": n / samples} for f, n in merged.most_common(TOP_FRAMES)]
            owners = [{"owner": o, "share": n / samples} for o, n in by_owner.most_common()]
    wal = profile["wal"]
    span = profile["span_s"]
    return {
        "cycles": cycles,
        "cycles_per_s_in_window": m.rpc_per_s,
        "span_s": span,
        "cpu_ms_per_cycle": {
            "server": (m.usage.cpu_percent or 0) / 100 * m.duration_s * 1000 / (m.ok or 1),
            "postgres": profile["pg_cpu_s"] * 1000 * per,
            "redis": profile["redis_cpu_s"] * 1000 * per,
        },
        "rpcs_per_cycle": {k: v * per for k, v in rpcs.items()},
        "statements_per_cycle_by_rpc": {k: v * per for k, v in statements_by_rpc.items()},
        "statements_per_rpc": {k: v / rpcs[k] for k, v in statements_by_rpc.items() if rpcs.get(k)},
        "redis_commands_per_cycle": {k: v * per for k, v in sorted(profile["redis_commands"].items())},
        "invalidations_per_cycle": {
            "sent": metric("agentstore_cache_invalidations_sent_total") * per,
            "received": metric("agentstore_cache_invalidations_received_total") * per,
        },
        "wal_per_cycle": {
            "records": wal["wal_records"] * per,
            "bytes": float(wal["wal_bytes"]) * per,
            "syncs": wal["wal_sync"] * per,
            "sync_ms": wal["wal_sync_time"] * per,
            "write_ms": wal["wal_write_time"] * per,
        },
        "statements": statement_rows,
        "py_spy_samples": samples,
        "py_spy_inclusive": frames,
        "py_spy_by_leaf_owner": owners,
    }


def render(s: dict[str, Any]) -> str:
    lines = [
        f"claim_complete profile: {s['cycles']:,.0f} cycles over {s['span_s']:.1f} s "
        f"({s['cycles_per_s_in_window']:,.0f} cycles/s in the measured window)",
        "CPU ms per cycle: " + ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_ms_per_cycle"].items()),
        "RPCs per cycle: " + ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.2f}" for k, v in s["rpcs_per_cycle"].items()),
        "statements per RPC: "
        + ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.2f}" for k, v in s["statements_per_rpc"].items()),
        "statements per cycle by RPC: "
        + ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.2f}" for k, v in s["statements_per_cycle_by_rpc"].items()),
        "Redis commands per cycle: " + ", ".join(f"{k} {v:.2f}" for k, v in s["redis_commands_per_cycle"].items()),
        f"cache invalidations per cycle: sent {s['invalidations_per_cycle']['sent']:.2f}, "
        f"received {s['invalidations_per_cycle']['received']:.2f}",
        "WAL per cycle: " + ", ".join(f"{k} {v:,.2f}" for k, v in s["wal_per_cycle"].items()),
        "",
        f"{'calls/cycle':>11}  {'mean ms':>8}  {'ms/cycle':>8}  {'rows':>6}  {'WAL rec':>7}  "
        "statement (pg_stat_statements)",
    ]
    for r in s["statements"]:
        lines.append(
            f"{r['calls_per_cycle']:>11.2f}  {r['mean_ms']:>8.3f}  {r['ms_per_cycle']:>8.3f}  "
            f"{r['rows_per_call']:>6.1f}  {r['wal_records_per_cycle']:>7.1f}  {r['query']}"
        )
    lines += ["", f"py-spy of the server ({s['py_spy_samples']:,} busy samples): inclusive share, top frames"]
    lines += [f"{f['share']:>7.1%}  {f['frame']}" for f in s["py_spy_inclusive"]]
    lines += ["", "py-spy: where the samples' top frame lives (shares of the server's busy samples)"]
    lines += [f"{f['share']:>7.1%}  {f['owner']}" for f in s["py_spy_by_leaf_owner"] if f["share"] >= 0.002]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.profile_claims", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds (default 15)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (default 1)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON and the stacks go (default: a temp dir)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="claims-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="claims-servers-") as tmp:
        workdir = Path(tmp)
        with own_postgres(workdir) as (pg_url, postmaster), own_redis(workdir) as (redis_url, redis_process):
            opts = parse_options(
                [
                    "--scenario", "claim_complete",
                    "--duration", str(args.duration),
                    "--warmup", str(args.warmup),
                    "--agents", "1000",
                    "--noise-retries", "0",
                    "--no-references",
                    "--no-chart",
                    "--database-url", pg_url,
                    "--redis-url", redis_url,
                    "--output-dir", str(out),
                ]
            )  # fmt: skip
            bench = ProfilingBench(opts)
            bench.postmaster, bench.redis_process, bench.out, bench.rate = postmaster, redis_process, out, args.rate
            code = asyncio.run(bench.run())
    if code != 0 or not hasattr(bench, "profile"):
        print("profile_claims: the claim_complete run failed (see above)", file=sys.stderr)
        return 1
    summary = summarize(bench.profile)
    (out / "claims-profile.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(render(summary))
    print(f"\nwrote {out / 'claims-profile.json'}; py-spy stacks: {bench.profile['stacks']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
