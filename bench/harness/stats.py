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
    """p50/p90/p95/p99 and mean, in milliseconds."""

    p50_ms: float | None = None
    p90_ms: float | None = None
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
            p90_ms=ms(percentile(ordered, 90)),
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


# The performance bar this run is held to: p99 of Get at half its saturation rate.
HALF_RATE_FRACTION = 0.5
HALF_RATE_P99_BAR_MS = 5.0


@dataclass
class HalfRate:
    """A second, rate-limited run at a fraction (half) of the RPC/s a saturated run reached.

    h2load's --rps limits each connection, so the total target is split over the connections.
    """

    saturated_rpc_per_s: float
    target_rpc_per_s: float
    rps_per_connection: float
    connections: int
    measurement: Measurement | None = None
    error: str | None = None
    # Not attempted (no h2load, no rate to halve): `error` says why.
    skipped: bool = False

    @property
    def status(self) -> str:
        return "ok" if self.measurement is not None else "skipped" if self.skipped else "error"

    @property
    def p99_ms(self) -> float | None:
        return self.measurement.latency.p99_ms if self.measurement is not None else None

    def note(self) -> str:
        """The table's note: 'p99 at half saturation (N RPC/s): X ms'."""
        if self.measurement is None:
            verb = "skipped" if self.skipped else "failed"
            return f"half-saturation run {verb}: {self.error or 'unknown error'}"
        p99 = self.p99_ms
        text = f"p99 at half saturation ({self.target_rpc_per_s:,.0f} RPC/s): "
        return text + ("—" if p99 is None else f"{p99:.2f} ms")

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        p99 = self.p99_ms
        return {
            "status": self.status,
            "error": self.error,
            "fraction": HALF_RATE_FRACTION,
            "saturated_rpc_per_s": self.saturated_rpc_per_s,
            "target_rpc_per_s": self.target_rpc_per_s,
            "rps_per_connection": self.rps_per_connection,
            "connections": self.connections,
            "rpc_per_s": m.rpc_per_s if m else None,
            "p50_ms": m.latency.p50_ms if m else None,
            "p95_ms": m.latency.p95_ms if m else None,
            "p99_ms": m.latency.p99_ms if m else None,
            "errors": m.errors if m else None,
            "p99_bar_ms": HALF_RATE_P99_BAR_MS,
            "p99_within_bar": None if p99 is None else p99 <= HALF_RATE_P99_BAR_MS,
            "measurement": m.to_json() if m else None,
        }


# The offered rates (RPC/s, all connections together) at which same_rate runs GetAgent from L1
# and echo, one after the other, to compare the latency a caller feels at the same load.
SAME_RATES = (1000, 2000, 3000)
# Below this share of the offered rate, a run fell behind: h2load held requests back, and their
# wait is not in its latencies (coordinated omission), so the percentiles flatter the server.
SAME_RATE_REACHED = 0.97


@dataclass
class SameRate:
    """One server at one offered rate (h2load --rps), in the same_rate scenario."""

    server: str  # "agentstore", "agentstore, access log on", "echo"
    offered_rpc_per_s: float
    rps_per_connection: float
    measurement: Measurement | None = None
    error: str | None = None

    @property
    def fell_behind(self) -> bool:
        m = self.measurement
        return m is not None and m.rpc_per_s < SAME_RATE_REACHED * self.offered_rpc_per_s

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        lat = m.latency if m else Latencies()
        return {
            "server": self.server,
            "offered_rpc_per_s": self.offered_rpc_per_s,
            "rps_per_connection": self.rps_per_connection,
            "status": "ok" if m is not None else "error",
            "error": self.error,
            "rpc_per_s": m.rpc_per_s if m else None,
            "fell_behind": self.fell_behind,
            "p50_ms": lat.p50_ms,
            "p90_ms": lat.p90_ms,
            "p99_ms": lat.p99_ms,
            "errors": m.errors if m else None,
            "server_cpu_percent": m.usage.cpu_percent if m else None,
            "other_cpu_percent": m.usage.other_cpu_percent if m else None,
            "measurement": m.to_json() if m else None,
        }
