"""The benchmark harness (bench/README.md): `make bench`, or `bench/.venv/bin/python -m harness`.

    make bench ARGS="--scenario get_l1 --duration 5"

Starts `agentstore serve` and the reference servers of bench/ against a scratch database,
drives them with h2load (fixed requests) or a multi-process grpc.aio generator, and writes
bench/results/<timestamp>.json and .png. It is not part of the agentstore package: it runs from a
checkout, in the environment `make bench-venv` builds (bench/pyproject.toml), and talks to the
server only through its commands (`agentstore serve`, `agentstore migrate`) and gRPC. Imports stay
lazy: the generator's worker processes import `harness.pyload` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m harness`; returns the exit code."""
    import sys

    from harness.options import parse_options

    opts = parse_options(sys.argv[1:] if argv is None else argv)
    try:
        from harness.runner import run_sync
    except ImportError as exc:  # run outside the bench's own environment
        print(f"bench: {exc}; build the bench environment with `make bench-venv`", file=sys.stderr)
        return 2
    try:
        return run_sync(opts)
    except Exception as exc:
        print(f"bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


__all__ = ["main"]
