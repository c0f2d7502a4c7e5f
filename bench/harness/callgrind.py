"""Instructions per GetAgent in the server process, counted by callgrind: deterministic where RPC/s is not.

    make bench-callgrind                       (= bench/.venv/bin/python -m harness.callgrind)
    bench/.venv/bin/python -m harness.callgrind --targets l1 --keep-profiles /tmp/cg

Per target (agentstore GetAgent from L1; from L2 with L1 off; the echo server) the server runs
under `valgrind --tool=callgrind --instr-atstart=no` (not instrumented until told, so it starts in
seconds), answers the warm-up calls, then: `callgrind_control -i on`, CALLS sequential GetAgent
calls of one agent from a grpc.aio client in this process (outside valgrind),
`callgrind_control -i off`, a dump. Instructions per call = every instruction the server process
executed (all its threads) while instrumented ÷ CALLS: background jobs that ran meanwhile count,
since the process pays for them. The server's own cache counters, read before and after, check
that the calls took the path named (1,000 L1 hits, or 1,000 L2 hits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from agentstore.v1 import agent_service_pb2
from harness.options import parse_options
from harness.pyload import GET_AGENT, agent_id
from harness.runner import CACHE_MODES, Bench, Server, _delta, check_agent, log

TARGETS = ("l1", "l2", "echo")
# What each target must show in the server's counters over the window: (metric prefix, tier).
EXPECTED_HITS = {"l1": "l1", "l2": "l2"}
READY_S = 600.0
CALL_TIMEOUT_S = 120.0


@dataclass
class Count:
    target: str
    calls: int
    # Every instruction of the server process in the window of the calls.
    instructions: int
    seconds: float
    check: str
    # Instructions per second of an idle window before the calls (--idle-seconds): background work.
    idle_per_s: float = 0.0

    @property
    def raw_per_call(self) -> float:
        return self.instructions / self.calls

    @property
    def per_call(self) -> float:
        """Net of the background work the window's wall time would have cost anyway.

        The window's length depends on how busy the machine is (callgrind runs the server ~50x
        slower), and timers fire per second of wall time, not per call: without this the count
        moves with the machine's load. With it, it is the cost of the calls.
        """
        return (self.instructions - self.idle_per_s * self.seconds) / self.calls


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.callgrind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: l1, l2, echo (default all)")
    parser.add_argument("--calls", type=int, default=1000, help="measured calls per target (default 1000)")
    parser.add_argument("--warmup-calls", type=int, default=200, help="calls before counting starts (default 200)")
    parser.add_argument("--agents", type=int, default=1000, help="agents seeded (default 1000)")
    parser.add_argument("--database-url", default=None, help="overrides AGENTSTORE_BENCH_DATABASE_URL")
    parser.add_argument("--redis-url", default=None, help="overrides AGENTSTORE_BENCH_REDIS_URL")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="count an idle window of this length first, whose rate is subtracted from the calls' window "
        "(default 10; 0 = raw counts only)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting of the agentstore targets, e.g. AGENTSTORE_LEASE_SWEEP_INTERVAL_SECONDS=0 (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the counts to this file")
    parser.add_argument("--keep-profiles", type=Path, default=None, help="copy the callgrind.out files here")
    args = parser.parse_args(list(argv))
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if any("=" not in e for e in args.env):
        parser.error("--env takes NAME=VALUE")
    args.env = dict(e.split("=", 1) for e in args.env)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def callgrind_control(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {done.stdout}{done.stderr}")


def total_instructions(files: Sequence[Path]) -> int:
    """The sum of the `totals:` lines of every dump (an explicit dump, then the one at exit)."""
    total = 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def hits(delta: dict[str, float], tier: str) -> int:
    return int(
        sum(v for k, v in delta.items() if k.startswith("agentstore_cache_hits_total") and f'tier="{tier}"' in k)
    )


async def call_many(server: Server, bench: Bench, payload: bytes, n: int) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        get = channel.unary_unary(GET_AGENT)
        for _ in range(n):
            await get(payload, metadata=bench.metadata, timeout=CALL_TIMEOUT_S)


async def count(bench: Bench, target: str, args: argparse.Namespace) -> Count:
    out = bench.workdir / f"callgrind-{target}"
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    if target == "echo":
        server = await bench.start_echo(wrapper=wrapper, ready_s=READY_S, label="echo-callgrind")
    else:
        env = {**CACHE_MODES[f"get_{target}"], **args.env}
        server = await bench.start_agentstore(env, target, wrapper=wrapper, ready_s=READY_S)
    payload = agent_service_pb2.GetAgentRequest(id=agent_id(0)).SerializeToString()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            raw = await channel.unary_unary(GET_AGENT)(payload, metadata=bench.metadata, timeout=CALL_TIMEOUT_S)
        check_agent(None if target == "echo" else agent_id(0))(raw)
        await call_many(server, bench, payload, args.warmup_calls)
        idle, idle_s = 0, 0.0
        if args.idle_seconds > 0:
            # What the process executes with no RPC at all (background jobs, the Redis bus, timers).
            await asyncio.to_thread(callgrind_control, "-i", "on", str(server.pid))
            start = time.perf_counter()
            await asyncio.sleep(args.idle_seconds)
            idle_s = time.perf_counter() - start
            await asyncio.to_thread(callgrind_control, "-i", "off", str(server.pid))
            await asyncio.to_thread(callgrind_control, "-d", str(server.pid))
            idle = total_instructions(sorted(bench.workdir.glob(f"{out.name}.*")))
        before = await asyncio.to_thread(server.metrics)
        await asyncio.to_thread(callgrind_control, "-i", "on", str(server.pid))
        start = time.perf_counter()
        await call_many(server, bench, payload, args.calls)
        seconds = time.perf_counter() - start
        await asyncio.to_thread(callgrind_control, "-i", "off", str(server.pid))
        await asyncio.to_thread(callgrind_control, "-d", str(server.pid))
        after = await asyncio.to_thread(server.metrics)
    finally:
        await bench.stop_server(server)
    files = sorted(bench.workdir.glob(f"{out.name}.*"))
    if args.keep_profiles is not None:
        args.keep_profiles.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy(path, args.keep_profiles / path.name)
    instructions = total_instructions(files) - idle
    check = "no cache"
    tier = EXPECTED_HITS.get(target)
    if tier is not None:
        got = hits(_delta(before, after, "agentstore_"), tier)
        if got != args.calls:
            raise RuntimeError(f"{target}: {got} {tier} hits for {args.calls} calls: not the path to be measured")
        check = f"{got} {tier} hits"
    return Count(target, args.calls, instructions, seconds, check, idle / idle_s if idle_s else 0.0)


async def run(args: argparse.Namespace) -> list[Count]:
    argv = ["--agents", str(args.agents), "--no-references", "--no-chart"]
    for flag, value in (("--database-url", args.database_url), ("--redis-url", args.redis_url)):
        if value:
            argv += [flag, value]
    bench = Bench(parse_options(argv))
    counts: list[Count] = []
    try:
        await bench._setup()
        for target in args.targets:
            log(f"callgrind {target}: {args.calls} GetAgent after {args.warmup_calls} warm-up calls")
            result = await count(bench, target, args)
            log(f"callgrind {target}: {result.per_call / 1000:,.1f}k instructions per call")
            counts.append(result)
    finally:
        await bench._teardown()
    return counts


def table(counts: Sequence[Count]) -> str:
    """Instructions per call (net of idle background work, and raw), and echo's ratio to it."""
    echo = next((c.per_call for c in counts if c.target == "echo"), None)
    headers = ["target", "calls", "instructions/call", "echo / this", "raw/call", "window s", "idle instr/s"]
    rows = [
        [
            c.target,
            str(c.calls),
            f"{c.per_call:,.0f}",
            f"{echo / c.per_call:.2f}x" if echo else "—",
            f"{c.raw_per_call:,.0f}",
            f"{c.seconds:.1f}",
            f"{c.idle_per_s:,.0f}",
        ]
        for c in counts
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(cells, widths, strict=True)))

    checks = "; ".join(f"{c.target}: {c.check}" for c in counts)
    return "\n".join(
        [
            line(headers),
            "  ".join("-" * w for w in widths),
            *(line(r) for r in rows),
            "instructions/call = (instructions in the window - idle instr/s x window s) / calls; raw/call without",
            f"the subtraction. Paths checked from the server's counters: {checks}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.database_url = args.database_url or os.environ.get("AGENTSTORE_BENCH_DATABASE_URL")
    args.redis_url = args.redis_url or os.environ.get("AGENTSTORE_BENCH_REDIS_URL")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("harness.callgrind: valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    try:
        counts = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    print(table(counts))
    if args.json is not None:
        rows = [{**asdict(c), "raw_per_call": c.raw_per_call, "per_call": c.per_call} for c in counts]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
