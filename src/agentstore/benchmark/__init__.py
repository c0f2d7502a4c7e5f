"""`agentstore bench`: the benchmark harness (see bench/README.md).

    agentstore bench [--scenario NAME ...] [--duration S] [--server-cpus 0] [--client-cpus 1]

Starts `agentstore serve` and the reference servers of bench/ against a scratch database,
drives them with h2load (fixed requests) or a multi-process grpc.aio generator, and writes
bench/results/<timestamp>.json and .png. Imports stay lazy: the generator's worker processes
import `agentstore.benchmark.pyload` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `agentstore bench`; returns the exit code."""
    import sys

    from agentstore.benchmark.options import parse_options

    opts = parse_options(sys.argv[1:] if argv is None else argv)
    try:
        from agentstore.benchmark.runner import run_sync
    except ImportError as exc:  # psutil or matplotlib missing
        print(f"agentstore bench: {exc}; install the dev extra: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    try:
        return run_sync(opts)
    except Exception as exc:
        print(f"agentstore bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


__all__ = ["main"]
