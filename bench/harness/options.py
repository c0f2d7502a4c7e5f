"""The harness's command-line options (`make bench ARGS=...`, `python -m harness --help`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.scenarios import DEFAULT_SCENARIOS, SCENARIOS
from harness.stats import SAME_RATES

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


@dataclass
class Options:
    scenarios: list[str]
    duration: float
    warmup: float
    server_cpus: str | None
    client_cpus: str | None
    connections: int
    streams: int
    client_processes: int
    agents: int
    pool_size: int
    generator: str
    output_dir: Path
    database_url: str | None
    redis_url: str | None
    references: bool
    memory_requests: tuple[int, int]
    chart: bool
    noise_retries: int
    half_rate: bool = True
    same_rates: tuple[int, ...] = SAME_RATES
    # Extra settings of every `agentstore serve` the run starts (A/B runs of a setting).
    server_env: dict[str, str] = field(default_factory=dict)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _memory_requests(text: str) -> tuple[int, int]:
    try:
        first, second = (int(v.replace("_", "")) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected two counts, e.g. 100000,1000000") from None
    if not 0 < first < second:
        raise argparse.ArgumentTypeError("expected 0 < first < second")
    return first, second


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(v.replace("_", "")) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected RPC/s values, e.g. 1000,2000,3000") from None
    if not rates or min(rates) < 1:
        raise argparse.ArgumentTypeError("every rate must be at least 1 RPC/s")
    return rates


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(SCENARIOS)
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description=(
            "Benchmark agentstore against reference servers (echo, naive) in a scratch database. "
            "PostgreSQL and Redis come from AGENTSTORE_BENCH_DATABASE_URL (an admin URL that may create "
            "databases and roles) and AGENTSTORE_BENCH_REDIS_URL, else embedded servers are started."
        ),
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*SCENARIOS, "all"],
        metavar="NAME",
        help=f"run this scenario (repeatable; default: every scenario but memory). One of: {names}, all",
    )
    parser.add_argument(
        "--duration", metavar="S", type=float, default=10.0, help="measured seconds per run (default 10)"
    )
    parser.add_argument(
        "--warmup", metavar="S", type=float, default=1.0, help="warm-up seconds before each run (default 1)"
    )
    parser.add_argument(
        "--server-cpus", metavar="CPUS", default=None, help="taskset CPU list of the servers (default 0; '' = unpinned)"
    )
    parser.add_argument(
        "--client-cpus", metavar="CPUS", default=None, help="taskset CPU list of the generator (default 1)"
    )
    parser.add_argument(
        "--connections", metavar="N", type=_positive_int, default=4, help="h2load -c: connections (default 4)"
    )
    parser.add_argument(
        "--streams",
        metavar="N",
        type=_positive_int,
        default=8,
        help="h2load -m: concurrent streams per connection (default 8); the Python generator keeps "
        "connections x streams calls in flight too",
    )
    parser.add_argument(
        "--client-processes",
        metavar="N",
        type=int,
        default=0,
        help="processes of the Python generator (default: max(2, client CPUs))",
    )
    parser.add_argument(
        "--agents", metavar="N", type=_positive_int, default=100_000, help="agents seeded (default 100000)"
    )
    parser.add_argument(
        "--pool-size", metavar="N", type=_positive_int, default=10, help="database pool of each server (default 10)"
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "h2load", "python"),
        default="auto",
        help="fixed-request generator: h2load when installed (auto), or always the Python one",
    )
    parser.add_argument(
        "--output-dir", metavar="DIR", type=Path, default=None, help="where results go (default bench/results)"
    )
    parser.add_argument("--database-url", metavar="URL", default=None, help="overrides AGENTSTORE_BENCH_DATABASE_URL")
    parser.add_argument("--redis-url", metavar="URL", default=None, help="overrides AGENTSTORE_BENCH_REDIS_URL")
    parser.add_argument(
        "--no-references", dest="references", action="store_false", help="skip the echo and naive reference runs"
    )
    parser.add_argument(
        "--memory-requests",
        metavar="N,M",
        type=_memory_requests,
        default=(100_000, 1_000_000),
        help="the two request counts of the memory scenario (default 100000,1000000)",
    )
    parser.add_argument("--no-chart", dest="chart", action="store_false", help="do not draw the PNG chart")
    parser.add_argument(
        "--noise-retries",
        metavar="N",
        type=int,
        default=2,
        help="repeat a run up to N times while other work used over 20%% CPU during it (default 2)",
    )
    parser.add_argument(
        "--no-half-rate",
        dest="half_rate",
        action="store_false",
        help="skip the second, rate-limited h2load run of the get_* scenarios at half their saturated RPC/s "
        "(p50/p95/p99 at half saturation; on by default, one extra run per scenario and reference)",
    )
    parser.add_argument(
        "--same-rates",
        metavar="R,R,...",
        type=_rates,
        default=SAME_RATES,
        help="offered rates (RPC/s, all connections together) of the same_rate scenario (default 1000,2000,3000)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra setting of every agentstore server, e.g. AGENTSTORE_LEASE_SWEEP_INTERVAL_SECONDS=0 (repeatable)",
    )
    return parser


def parse_options(argv: Sequence[str]) -> Options:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    chosen: list[str] = args.scenario or list(DEFAULT_SCENARIOS)
    if "all" in chosen:
        chosen = [name for name in SCENARIOS]
    scenarios = [name for name in SCENARIOS if name in chosen]  # catalogue order, no duplicates
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    return Options(
        scenarios=scenarios,
        duration=args.duration,
        warmup=args.warmup,
        server_cpus=args.server_cpus,
        client_cpus=args.client_cpus,
        connections=args.connections,
        streams=args.streams,
        client_processes=max(0, args.client_processes),
        agents=args.agents,
        pool_size=args.pool_size,
        generator=args.generator,
        output_dir=args.output_dir or RESULTS_DIR,
        database_url=args.database_url or os.environ.get("AGENTSTORE_BENCH_DATABASE_URL") or None,
        redis_url=args.redis_url or os.environ.get("AGENTSTORE_BENCH_REDIS_URL") or None,
        references=args.references,
        memory_requests=args.memory_requests,
        chart=args.chart,
        noise_retries=max(0, args.noise_retries),
        half_rate=args.half_rate,
        same_rates=args.same_rates,
        server_env=dict(item.split("=", 1) for item in args.server_env),
    )
