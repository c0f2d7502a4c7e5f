"""Latency statistics and the result record of one measurement."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Latencies:
    """p50/p95/p99 and mean, in milliseconds."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Latencies:
        ordered = sorted(values)
        if not ordered:
            return cls()

        def ms(v: float | None) -> float | None:
            return None if v is None else v * 1000.0

        return cls(
            p50_ms=ms(percentile(ordered, 50)),
            p95_ms=ms(percentile(ordered, 95)),
            p99_ms=ms(percentile(ordered, 99)),
            mean_ms=sum(ordered) / len(ordered) * 1000.0,
            max_ms=ordered[-1] * 1000.0,
        )


@dataclass
class Usage:
    """What the process under test used while it was measured."""

    cpu_percent: float | None = None
    peak_rss_mib: float | None = None
    rss_end_mib: float | None = None
    # Every PostgreSQL and Redis process, summed (100 = one core), when visible.
    db_cpu_percent: float | None = None
    # The whole machine (100 = one core): server + database + generator + anything else.
    host_cpu_percent: float | None = None
    # The load generator's processes (h2load or the Python workers).
    generator_cpu_percent: float | None = None
    # What the machine spent on anything else: noise from other work.
    other_cpu_percent: float | None = None


@dataclass
class Measurement:
    """One generator run against one target (agentstore, echo or naive)."""

    target: str
    generator: str
    rpc: str
    duration_s: float
    requests: int
    ok: int
    errors: int
    rpc_per_s: float
    latency: Latencies
    usage: Usage
    error_codes: dict[str, int] = field(default_factory=dict)
    error_sample: str = ""
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
