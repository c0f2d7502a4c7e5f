"""Fixed-request load with h2load: a pre-encoded gRPC frame posted over HTTP/2.

h2load knows nothing of gRPC: it counts every HTTP 200 as a success even when grpc-status in the
trailers says otherwise. The harness therefore checks one real gRPC call before each run and
counts grpc-status itself where it can (agentstore's own metrics).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.stats import Latencies


def grpc_frame(message: bytes) -> bytes:
    """A length-prefixed gRPC message: 0 (no compression), 4-byte big-endian length, payload."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def find_h2load() -> str | None:
    return shutil.which("h2load")


def h2load_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return out.stdout.strip() or out.stderr.strip() or "unknown"


@dataclass
class H2loadResult:
    requests: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    status_other: int
    req_per_s: float
    duration_s: float
    latency: Latencies
    stdout: str
    log_lines: int

    @property
    def transport_errors(self) -> int:
        """Requests that did not come back as HTTP 200 (h2load's own view of failure)."""
        # h2load's "failed" includes its "errored" and "timeout"; 3xx would count as succeeded.
        return max(self.failed, self.errored + self.timeout) + max(0, self.succeeded - self.status_2xx)


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_REQ_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float | None:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * _UNIT[match.group(2)] if match else None


def parse_output(stdout: str) -> dict[str, float]:
    """The numbers h2load prints; raises ValueError when the summary is missing."""
    finished = _FINISHED.search(stdout)
    requests = _REQUESTS.search(stdout)
    if finished is None or requests is None:
        raise ValueError("h2load printed no summary")
    values: dict[str, float] = {
        "elapsed_s": float(finished.group(1)) * _UNIT[finished.group(2)],
        "req_per_s": float(finished.group(3)),
    }
    for key, raw in zip(
        ("total", "started", "done", "succeeded", "failed", "errored", "timeout"), requests.groups(), strict=True
    ):
        values[key] = int(raw)
    status = _STATUS.search(stdout)
    if status is not None:
        values["2xx"], values["3xx"], values["4xx"], values["5xx"] = (int(g) for g in status.groups())
    req_time = _REQ_TIME.search(stdout)
    if req_time is not None:
        for key, raw in zip(("min", "max", "mean", "sd"), req_time.groups(), strict=True):
            seconds = _seconds(raw)
            if seconds is not None:
                values[f"request_{key}_s"] = seconds
    return values


def log_latencies(path: Path) -> tuple[list[float], int]:
    """Per-request durations (seconds) of HTTP-200 requests from --log-file, and the line count.

    Columns: start time (µs since the epoch), HTTP status, µs until the end of the response.
    """
    durations: list[float] = []
    lines = 0
    try:
        with path.open() as fh:
            for line in fh:
                parts = line.split("\t")
                if len(parts) < 3:
                    continue
                lines += 1
                if parts[1] == "200":
                    durations.append(int(parts[2]) / 1e6)
    except OSError:
        pass
    return durations, lines


def build_command(
    binary: str,
    url: str,
    frame_file: Path,
    headers: Sequence[tuple[str, str]],
    *,
    connections: int,
    streams: int,
    threads: int,
    log_file: Path,
    duration: float | None = None,
    warmup: float | None = None,
    requests: int | None = None,
    rps_per_connection: float | None = None,
) -> list[str]:
    """The h2load command line; `rps_per_connection` rate-limits every connection (h2load --rps).

    h2load's --rps is per client, i.e. per connection (-c): the total rate is connections x rps.
    """
    cmd = [binary, "-c", str(connections), "-m", str(streams), "-t", str(max(1, min(threads, connections)))]
    if rps_per_connection is not None:
        if rps_per_connection <= 0:
            raise ValueError("rps_per_connection must be positive")
        cmd.append(f"--rps={rps_per_connection:.3f}")
    if duration is not None:
        # h2load takes whole numbers with a unit (10s, 200ms), not fractions.
        cmd += ["-D", f"{max(1, round(duration * 1000))}ms"]
        if warmup:
            cmd += [f"--warm-up-time={max(1, round(warmup * 1000))}ms"]
    elif requests is not None:
        cmd += ["-n", str(requests)]
    else:
        raise ValueError("duration or requests is required")
    cmd += ["-d", str(frame_file), f"--log-file={log_file}"]
    for name, value in headers:
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    return cmd


def grpc_headers(authorization: str | None) -> list[tuple[str, str]]:
    headers = [("content-type", "application/grpc"), ("te", "trailers")]
    if authorization:
        headers.append(("authorization", authorization))
    return headers


async def run_h2load(command: Sequence[str], log_file: Path, *, limit_s: float) -> H2loadResult:
    """Run h2load to completion and summarise it; percentiles come from the per-request log."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    stdout = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited with {proc.returncode}:\n{stdout[-2000:]}")
    values = parse_output(stdout)
    durations, lines = log_latencies(log_file)
    durations.sort()
    latency = Latencies.of_seconds(durations) if durations else Latencies()
    if not durations and "request_mean_s" in values:
        latency = Latencies(mean_ms=values["request_mean_s"] * 1000, max_ms=values.get("request_max_s", 0) * 1000)
    done = int(values["done"])
    ok_2xx = int(values.get("2xx", values["succeeded"]))
    other = int(values.get("3xx", 0) + values.get("4xx", 0) + values.get("5xx", 0))
    return H2loadResult(
        requests=int(values["total"]),
        done=done,
        succeeded=int(values["succeeded"]),
        failed=int(values["failed"]),
        errored=int(values["errored"]),
        timeout=int(values["timeout"]),
        status_2xx=ok_2xx,
        status_other=other,
        req_per_s=values["req_per_s"],
        duration_s=values["elapsed_s"],
        latency=latency,
        stdout=stdout,
        log_lines=lines,
    )
