"""The table, the JSON document and the chart of one run."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.stats import HALF_RATE_FRACTION, HALF_RATE_P99_BAR_MS, HalfRate, Measurement

if TYPE_CHECKING:
    from harness.runner import Bench


@dataclass
class Reference:
    """A reference server measured with one workload through one generator."""

    id: str
    target: str
    workload: str
    generator: str
    measurement: Measurement | None = None
    error: str | None = None
    used_by: list[str] = field(default_factory=list)

    generator_cores: int = 1
    # The rate-limited run at half of this reference's saturated RPC/s (GetAgent only).
    half_rate: HalfRate | None = None

    @property
    def generator_bound(self) -> bool:
        """An echo run limited by the generator: the server had CPU to spare, or the generator had none."""
        m = self.measurement
        if self.target != "echo" or m is None:
            return False
        server_spare = m.usage.cpu_percent is not None and m.usage.cpu_percent < 90
        generator_full = (
            m.usage.generator_cpu_percent is not None and m.usage.generator_cpu_percent >= 90 * self.generator_cores
        )
        return server_spare or generator_full

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "generator_bound": self.generator_bound,
            "target": self.target,
            "workload": self.workload,
            "generator": self.generator,
            "status": "ok" if self.measurement is not None else "error",
            "error": self.error,
            "used_by": self.used_by,
            "measurement": self.measurement.to_json() if self.measurement else None,
            "half_saturation": self.half_rate.to_json() if self.half_rate else None,
        }


@dataclass
class ScenarioResult:
    name: str
    description: str
    status: str = "pending"  # ok | skipped | error
    measurement: Measurement | None = None
    echo: Reference | None = None
    naive: Reference | None = None
    ratio_vs_echo: float | None = None
    ratio_vs_naive: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # get_*: a second, rate-limited run at half the saturated RPC/s (None when not measured).
    half_rate: HalfRate | None = None

    def compute_ratios(self) -> None:
        m = self.measurement
        if m is None or self.status != "ok":
            return
        for attr, ref in (("ratio_vs_echo", self.echo), ("ratio_vs_naive", self.naive)):
            if ref is not None and ref.measurement is not None and ref.measurement.rpc_per_s > 0:
                setattr(self, attr, m.rpc_per_s / ref.measurement.rpc_per_s)
        if self.echo is not None and self.echo.generator_bound and (self.ratio_vs_echo or 0) > 0.8:
            self.notes.append("near the generator's limit: agentstore's RPC/s is a lower bound")
        cpu = m.usage.cpu_percent
        # A rate-limited run (h2load --rps) is meant to leave the server idle part of the time.
        if cpu is not None and cpu < 75 and m.extra.get("rps_per_connection") is None:
            self.notes.append(f"server only {cpu:.0f}% CPU: bound by PostgreSQL/Redis or the generator")

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "name": self.name,
            "description": self.description,
            "status": self.status,
            "generator": m.generator if m else None,
            "rpc_per_s": m.rpc_per_s if m else None,
            "p50_ms": m.latency.p50_ms if m else None,
            "p95_ms": m.latency.p95_ms if m else None,
            "p99_ms": m.latency.p99_ms if m else None,
            "errors": m.errors if m else None,
            "server_cpu_percent": m.usage.cpu_percent if m else None,
            "server_peak_rss_mib": m.usage.peak_rss_mib if m else None,
            "ratio_vs_echo": self.ratio_vs_echo,
            "ratio_vs_naive": self.ratio_vs_naive,
            "echo_reference": self.echo.id if self.echo else None,
            "naive_reference": self.naive.id if self.naive else None,
            "notes": self.notes,
            "measurement": m.to_json() if m else None,
            "half_saturation": self.half_rate.to_json() if self.half_rate else None,
            "extra": self.extra,
        }


# ----------------------------------------------------------------------------------------- table


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _render(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [
        max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i]) for i in range(len(headers))
    ]

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _metric_cells(m: Measurement) -> list[str]:
    return [
        _num(m.rpc_per_s),
        _num(m.latency.p50_ms, 2),
        _num(m.latency.p95_ms, 2),
        _num(m.latency.p99_ms, 2),
        str(m.errors),
        _num(m.usage.cpu_percent),
        _num(m.usage.peak_rss_mib, 1),
        _num(m.usage.db_cpu_percent),
        _num(m.usage.generator_cpu_percent),
        _num(m.usage.other_cpu_percent),
    ]


METRIC_HEADERS = [
    "RPC/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "CPU %",
    "peak RSS MiB",
    "PG+Redis CPU %",
    "gen CPU %",
    "other CPU %",
]


def scenario_table(results: list[ScenarioResult]) -> str:
    headers = ["scenario", "generator", *METRIC_HEADERS, "vs echo", "vs naive", "notes"]
    rows: list[list[str]] = []
    for r in results:
        m = r.measurement
        if m is not None and r.status == "ok":
            cells = [r.name, m.generator, *_metric_cells(m), _ratio(r.ratio_vs_echo), _ratio(r.ratio_vs_naive)]
        elif r.status == "ok":  # a comparison without a measurement of its own (queue_peers): see its table
            cells = [r.name, "—", *["—"] * (len(METRIC_HEADERS) + 2)]
        else:
            cells = [r.name, "—", r.status.upper(), *["—"] * (len(METRIC_HEADERS) + 1)]
        rows.append([*cells, "; ".join(r.notes)])
    return _render(headers, rows, right=set(range(2, len(headers) - 1)))


def reference_table(references: list[Reference]) -> str:
    headers = ["reference", "generator", *METRIC_HEADERS, "used by / notes"]
    rows: list[list[str]] = []
    for ref in references:
        if ref.measurement is not None:
            cells = [f"{ref.target} {ref.workload}", ref.generator, *_metric_cells(ref.measurement)]
        else:
            cells = [f"{ref.target} {ref.workload}", ref.generator, "ERROR", *["—"] * (len(METRIC_HEADERS) - 1)]
        used = ", ".join(ref.used_by)
        if ref.measurement is not None and ref.measurement.notes:
            used += "; " + "; ".join(ref.measurement.notes)
        if ref.error:
            used += f" ({ref.error})"
        if ref.generator_bound:
            used += "; generator at its limit: echo's true ceiling is higher, ratios against it flatter agentstore"
        if ref.half_rate is not None:
            used += "; " + ref.half_rate.note()
        rows.append([*cells, used])
    return _render(headers, rows, right=set(range(2, len(headers) - 1)))


def half_rate_table(bench: Bench) -> str | None:
    """Latency of the rate-limited runs at half the saturated RPC/s, agentstore's first; None without any."""
    runs: list[tuple[str, HalfRate, bool]] = [
        (f"{r.name} (agentstore)", r.half_rate, True) for r in bench.results if r.half_rate is not None
    ]
    runs += [
        (f"{ref.target} {ref.workload}", ref.half_rate, False) for ref in bench.references.values() if ref.half_rate
    ]
    if not runs:
        return None
    headers = [
        "run",
        "saturated RPC/s",
        "target RPC/s",
        "RPC/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "CPU %",
        "other CPU %",
        f"p99 <= {HALF_RATE_P99_BAR_MS:g} ms",
    ]
    rows: list[list[str]] = []
    for label, half, is_agentstore in runs:
        m = half.measurement
        if m is None:
            rows.append([label, _num(half.saturated_rpc_per_s), _num(half.target_rpc_per_s), half.status.upper()])
            rows[-1] += ["—"] * (len(headers) - len(rows[-1]) - 1) + [half.error or ""]
            continue
        p99 = m.latency.p99_ms
        verdict = "—" if not is_agentstore or p99 is None else ("yes" if p99 <= HALF_RATE_P99_BAR_MS else "NO")
        rows.append(
            [
                label,
                _num(half.saturated_rpc_per_s),
                _num(half.target_rpc_per_s),
                _num(m.rpc_per_s),
                _num(m.latency.p50_ms, 2),
                _num(m.latency.p95_ms, 2),
                _num(p99, 2),
                str(m.errors),
                _num(m.usage.cpu_percent),
                _num(m.usage.other_cpu_percent),
                verdict,
            ]
        )
    return _render(headers, rows, right=set(range(1, len(headers) - 1)))


def same_rate_table(bench: Bench) -> str | None:
    """same_rate: every server at every offered rate, and what agentstore adds over echo; None without it."""
    runs = [run for r in bench.results for run in r.extra.get("same_rate", [])]
    if not runs:
        return None
    echo = {run["offered_rpc_per_s"]: run for run in runs if run["server"] == "echo"}
    headers = [
        "offered RPC/s",
        "server",
        "RPC/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "CPU %",
        "other CPU %",
        "+p50 ms",
        "+p90 ms",
        "+p99 ms",
        "notes",
    ]
    rows: list[list[str]] = []
    for run in runs:
        if run["status"] != "ok":
            rows.append([_num(run["offered_rpc_per_s"]), run["server"], "ERROR", *["—"] * 9, run["error"] or ""])
            continue
        ref = echo.get(run["offered_rpc_per_s"])
        added = ["—"] * 3
        if run["server"] != "echo" and ref is not None and ref["status"] == "ok":
            added = [f"{run[k] - ref[k]:+.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")]
        note = "fell behind the offered rate: percentiles flatter it" if run["fell_behind"] else ""
        rows.append(
            [
                _num(run["offered_rpc_per_s"]),
                run["server"],
                _num(run["rpc_per_s"]),
                _num(run["p50_ms"], 2),
                _num(run["p90_ms"], 2),
                _num(run["p99_ms"], 2),
                str(run["errors"]),
                _num(run["server_cpu_percent"]),
                _num(run["other_cpu_percent"]),
                *added,
                note,
            ]
        )
    return _render(headers, rows, right={0, *range(2, len(headers) - 1)})


def queue_peers_table(bench: Bench) -> str | None:
    """queue_peers: agentstore and each peer, jobs/s and rows/s, agentstore's ratio to each; None without it."""
    docs = [r.extra["queue_peers"] for r in bench.results if "queue_peers" in r.extra]
    if not docs:
        return None
    doc = docs[-1]
    mine = doc["agentstore"]
    headers = [
        "queue",
        "version",
        "claim->complete jobs/s",
        "agentstore / it",
        "bulk rows/s",
        "agentstore / it",
        "other CPU %",
        "notes",
    ]
    other = "/".join(_num(mine.get(k)) for k in ("claim_other_cpu_percent", "bulk_other_cpu_percent"))
    rows = [
        ["agentstore", "this code", _num(mine["claim_jobs_per_s"]), "—", _num(mine["bulk_rows_per_s"]), "—", other, ""],
    ]
    for peer in doc["peers"]:
        if peer["status"] != "ok":
            rows.append([peer["name"], "—", peer["status"].upper(), "—", "—", "—", "—", peer["reason"] or ""])
            continue
        ratios = peer["raw"].get("ratios", {})
        note = "ran out of jobs early: jobs/s is a lower bound" if peer["drained_early"] else ""
        rows.append(
            [
                peer["name"],
                peer["version"] or "—",
                _num(peer["claim_jobs_per_s"]),
                _ratio(ratios.get("claim_complete")),
                _num(peer["bulk_rows_per_s"]),
                _ratio(ratios.get("batch_create_tasks")),
                _num(peer.get("other_cpu_percent")),
                note,
            ]
        )
    return _render(headers, rows, right={2, 3, 4, 5, 6})


def header_lines(bench: Bench) -> list[str]:
    o = bench.opts
    python_gen = f"Python generator: {bench.processes} processes, {bench.inflight} calls in flight in total"
    return [
        f"agentstore bench {bench.tag}: {o.duration:g}s per run after {o.warmup:g}s warm-up, "
        f"{o.agents:,} agents seeded, server DB pool {o.pool_size}",
        f"generator: {bench.generator_note}; {python_gen}; h2load -c {o.connections} -m {o.streams}",
        f"pinning: {bench.pinning.note}",
        *([f"server settings added: {' '.join(f'{k}={v}' for k, v in o.server_env.items())}"] if o.server_env else []),
        f"backends: {bench.backends.description if bench.backends else '—'}",
        "CPU % is the server process alone; PG+Redis, gen(erator) and other (anything else on the machine: "
        "noise) are CPU % over the same window, 100 = one core",
        "ratios compare RPC/s with the reference server under the same workload and generator",
    ]


def full_text(bench: Bench) -> str:
    lines = header_lines(bench)
    from harness.runner import BUSY_WARNING_PERCENT

    if bench.busy_before > BUSY_WARNING_PERCENT:
        lines.append(
            f"warning: the CPUs were {bench.busy_before:.0f}% busy before the run (other work), "
            "so absolute numbers are noisy (ratios less so)"
        )
    parts = ["\n".join(lines), "", scenario_table(bench.results)]
    if bench.references:
        parts += ["", "references (same generator, same workload):", reference_table(list(bench.references.values()))]
    half = half_rate_table(bench)
    if half is not None:
        parts += [
            "",
            f"latency at {HALF_RATE_FRACTION:.0%} of the saturated RPC/s (second h2load run, --rps = target / "
            f"{bench.opts.connections} connections; bar: GetAgent p99 <= {HALF_RATE_P99_BAR_MS:g} ms):",
            half,
        ]
    same = same_rate_table(bench)
    if same is not None:
        parts += [
            "",
            f"latency at the same offered load (same_rate: GetAgent from L1 vs echo, h2load --rps = offered / "
            f"{bench.opts.connections} connections, -m {bench.opts.streams}; +pNN = agentstore minus echo):",
            same,
        ]
    peers = queue_peers_table(bench)
    if peers is not None:
        parts += [
            "",
            "queue peers (same PostgreSQL, own scratch databases; claim -> complete: 8 workers, no-op handler; "
            "bulk insert: 1,000 rows per call, 4 calls in flight; agentstore = claim_complete and batch_create_tasks; "
            "other CPU % = other work on the machine during agentstore's claim/bulk runs and a peer's whole run):",
            peers,
        ]
    if bench.problems:
        parts += ["", *(f"problem: {p}" for p in bench.problems)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ files


def _host() -> dict[str, Any]:
    import grpc

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
    }


def document(bench: Bench, started: datetime, text: str) -> dict[str, Any]:
    o = bench.opts
    return {
        "schema": 1,
        "run_id": bench.tag,
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "host": _host(),
        "config": {
            "scenarios": o.scenarios,
            "duration_s": o.duration,
            "warmup_s": o.warmup,
            "connections": o.connections,
            "streams_per_connection": o.streams,
            "inflight_total": bench.inflight,
            "python_processes": bench.processes,
            "agents": o.agents,
            "pool_size": o.pool_size,
            "generator_option": o.generator,
            "references": o.references,
            "memory_requests": list(o.memory_requests),
            "noise_retries": o.noise_retries,
            "half_rate": o.half_rate,
            "half_rate_fraction": HALF_RATE_FRACTION,
            "same_rates": list(o.same_rates),
            "server_env": o.server_env,
        },
        "generator": {
            "fixed_requests": "h2load" if bench.h2load else "python",
            "h2load": bench.h2load,
            "note": bench.generator_note,
        },
        "pinning": {
            "enabled": bench.pinning.enabled,
            "server_cpus": bench.pinning.server_cpus,
            "client_cpus": bench.pinning.client_cpus,
            "note": bench.pinning.note,
        },
        "backends": bench.backends.description if bench.backends else None,
        "host_cpu_busy_before_percent": bench.busy_before,
        "scenarios": [r.to_json() for r in bench.results],
        "references": [ref.to_json() for ref in bench.references.values()],
        "problems": bench.problems,
        "table": text,
    }


def draw_chart(bench: Bench, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in bench.results if r.status == "ok" and r.measurement is not None]
    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.6 * len(ok) + 1.8)))
    names = [r.name for r in ok]
    ys = list(range(len(ok)))
    height = 0.26
    series = (
        ("agentstore", [r.measurement.rpc_per_s if r.measurement else 0 for r in ok], "#1f77b4", -height),
        (
            "echo (ceiling)",
            [r.echo.measurement.rpc_per_s if r.echo and r.echo.measurement else 0 for r in ok],
            "#c7c7c7",
            0.0,
        ),
        (
            "naive asyncpg",
            [r.naive.measurement.rpc_per_s if r.naive and r.naive.measurement else 0 for r in ok],
            "#ff7f0e",
            height,
        ),
    )
    for label, values, color, offset in series:
        if any(values):
            ax_rate.barh([y + offset for y in ys], values, height=height, color=color, label=label)
    ax_rate.set_yticks(ys, names)
    ax_rate.invert_yaxis()
    ax_rate.set_xlabel("RPC/s")
    ax_rate.set_title("throughput")
    ax_rate.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    ax_rate.grid(axis="x", alpha=0.3)
    for y, r in zip(ys, ok, strict=True):
        labels = [
            f"{name} {value:.2f}x"
            for name, value in (("echo", r.ratio_vs_echo), ("naive", r.ratio_vs_naive))
            if value is not None
        ]
        if labels and r.measurement is not None:
            ax_rate.annotate(
                ", ".join(labels),
                (r.measurement.rpc_per_s, y - height),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="#1f3b5c",
            )
    p50 = [r.measurement.latency.p50_ms or 0 if r.measurement else 0 for r in ok]
    p99 = [r.measurement.latency.p99_ms or 0 if r.measurement else 0 for r in ok]
    ax_lat.barh([y - height / 2 for y in ys], p50, height=height, color="#2ca02c", label="p50")
    ax_lat.barh([y + height / 2 for y in ys], p99, height=height, color="#d62728", label="p99")
    ax_lat.set_yticks(ys, names)
    ax_lat.invert_yaxis()
    ax_lat.set_xlabel("ms (agentstore)")
    ax_lat.set_title("latency")
    ax_lat.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax_lat.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(bench: Bench, started: datetime) -> list[Path]:
    text = full_text(bench)
    print(text, flush=True)
    out = bench.opts.output_dir
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(document(bench, started, text), indent=2, default=str) + "\n")
    shutil.copyfile(json_path, out / "latest.json")
    paths = [json_path]
    if bench.opts.chart:
        png_path = out / f"{stamp}.png"
        title = (
            f"agentstore bench {stamp} · {os.cpu_count()} CPUs · {bench.pinning.note} · "
            f"{'h2load' if bench.h2load else 'Python generator'}"
        )
        try:
            draw_chart(bench, png_path, title)
        except Exception as exc:  # a chart must never lose the measurements
            bench.problems.append(f"chart not drawn: {exc}")
            print(f"agentstore bench: chart not drawn: {exc}", file=sys.stderr)
        else:
            shutil.copyfile(png_path, out / "latest.png")
            paths.append(png_path)
    return paths
