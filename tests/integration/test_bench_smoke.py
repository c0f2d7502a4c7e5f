"""The benchmark harness end to end, for a second per run: it works, it does not measure anything.

No timing assertions: only that the run completes, writes its JSON (and chart), measures every
runnable scenario without errors and reports the scenarios whose RPCs do not exist as skipped.
The task scenarios (claim_complete, batch_create_tasks) run agentstore alone, without references.
Without h2load on the machine the fixed-request scenario falls back to the Python generator, so
the first test passes either way; the second forces that fallback.

The harness is not part of the package: it runs from bench/ in its own environment
(bench/.venv), which the `bench_python` fixture builds through `make bench-venv` (a no-op when
it is up to date), exactly as `make bench` runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.conftest import Servers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bench_python() -> Path:
    """bench/.venv/bin/python (and the Node queue peer, when npm is there), built as `make bench` builds them."""
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "bench-venv", "bench-peers"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    python = REPO / "bench" / ".venv" / "bin" / "python"
    if done.returncode != 0 or not python.exists():
        pytest.fail(
            f"`make bench-venv bench-peers` failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return python


def run_bench(bench_python: Path, servers: Servers, out: Path, *args: str) -> dict[str, Any]:
    argv = [
        "--duration", "1",
        "--warmup", "0.2",
        "--agents", "500",
        "--connections", "2",
        "--streams", "2",
        "--client-processes", "2",
        "--noise-retries", "0",
        "--database-url", servers.admin_url,
        "--redis-url", servers.redis_url,
        "--output-dir", str(out),
        *args,
    ]  # fmt: skip
    done = subprocess.run(
        [str(bench_python), "-m", "harness", *argv], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1, list(out.iterdir())
    doc: dict[str, Any] = json.loads(stamped[0].read_text())
    assert json.loads((out / "latest.json").read_text()) == doc
    return doc


def bench_databases(admin_url: str, run_id: str) -> list[str]:
    con = psycopg2.connect(admin_url)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"agentstore_bench_{run_id}%",))
            return [row[0] for row in cur.fetchall()]
    finally:
        con.close()


def check_measured(row: dict[str, Any]) -> None:
    assert row["status"] == "ok", row
    assert row["rpc_per_s"] > 0, row
    assert row["errors"] == 0, row
    assert row["p50_ms"] is not None and row["p99_ms"] is not None, row
    assert row["server_cpu_percent"] is not None and row["server_peak_rss_mib"] > 0, row


def test_bench_runs_and_reports(bench_python: Path, servers: Servers, tmp_path: Path) -> None:
    doc = run_bench(
        bench_python,
        servers,
        tmp_path,
        "--scenario",
        "get_uncached",
        "--scenario",
        "create",
        "--scenario",
        "watch_fanout",
    )
    rows = {row["name"]: row for row in doc["scenarios"]}
    assert list(rows) == ["get_uncached", "create", "watch_fanout"]
    check_measured(rows["get_uncached"])
    check_measured(rows["create"])
    expected = "h2load" if shutil.which("h2load") else "python"
    assert doc["generator"]["fixed_requests"] == expected
    assert rows["get_uncached"]["generator"] == expected
    assert rows["create"]["generator"] == "python"
    assert rows["get_uncached"]["measurement"]["extra"]["verified"].startswith("GetAgent returned agent")

    # The second, rate-limited run at half the saturated RPC/s (h2load --rps): present, never timed here.
    half = rows["get_uncached"]["half_saturation"]
    assert half is not None
    assert half["target_rpc_per_s"] == pytest.approx(rows["get_uncached"]["rpc_per_s"] / 2)
    if expected == "h2load":
        assert half["status"] == "ok", half
        assert half["errors"] == 0, half
        assert half["p50_ms"] is not None and half["p99_ms"] is not None, half
        assert "--rps=" in half["measurement"]["extra"]["h2load_command"]
        assert any(note.startswith("p99 at half saturation") for note in rows["get_uncached"]["notes"])
        assert "at half saturation" in doc["table"]
    else:
        assert half["status"] == "skipped", half
    assert rows["create"]["half_saturation"] is None

    skipped = rows["watch_fanout"]
    assert skipped["status"] == "skipped"
    assert skipped["rpc_per_s"] is None
    assert any("not exist" in note or "no workload" in note for note in skipped["notes"])

    # The references ran through the same generators, and the ratios point at them.
    refs = {ref["id"]: ref for ref in doc["references"]}
    assert rows["get_uncached"]["echo_reference"] in refs
    assert rows["get_uncached"]["naive_reference"] in refs
    assert rows["create"]["echo_reference"] in refs
    for ref in refs.values():
        assert ref["status"] == "ok", ref
        if ref["workload"] == "GetAgent" and expected == "h2load":
            assert ref["half_saturation"]["status"] == "ok", ref["half_saturation"]
            assert ref["half_saturation"]["p99_ms"] is not None
        assert ref["measurement"]["errors"] == 0, ref
        assert ref["measurement"]["rpc_per_s"] > 0, ref
    assert rows["get_uncached"]["ratio_vs_echo"] > 0
    assert rows["get_uncached"]["ratio_vs_naive"] > 0

    assert "get_uncached" in doc["table"] and "SKIPPED" in doc["table"]
    assert (tmp_path / "latest.png").stat().st_size > 0
    assert not doc["problems"]


def test_bench_python_generator_fallback(bench_python: Path, servers: Servers, tmp_path: Path) -> None:
    doc = run_bench(
        bench_python, servers, tmp_path, "--scenario", "get_uncached", "--generator", "python", "--no-references"
    )
    assert doc["generator"]["fixed_requests"] == "python"
    [row] = doc["scenarios"]
    check_measured(row)
    assert row["generator"] == "python"
    assert row["ratio_vs_echo"] is None
    # The Python generator cannot limit its rate: the half-saturation run is skipped, and says so.
    assert row["half_saturation"]["status"] == "skipped"
    assert "h2load" in row["half_saturation"]["error"]


def test_bench_task_scenarios(bench_python: Path, servers: Servers, tmp_path: Path) -> None:
    doc = run_bench(
        bench_python,
        servers,
        tmp_path,
        "--scenario", "claim_complete",
        "--scenario", "batch_create_tasks",
        "--no-references",
        "--no-chart",
    )  # fmt: skip
    rows = {row["name"]: row for row in doc["scenarios"]}
    assert list(rows) == ["claim_complete", "batch_create_tasks"]
    for row in rows.values():
        check_measured(row)
        assert row["generator"] == "python"
        assert row["ratio_vs_echo"] is None and row["ratio_vs_naive"] is None
        assert any("no TaskService" in note for note in row["notes"]), row["notes"]
    assert not doc["references"]

    claims = rows["claim_complete"]["measurement"]
    # One op is one ClaimTask + CompleteTask cycle, timed as one; both calls counted.
    assert claims["extra"]["ops"] == claims["ok"]
    assert claims["extra"]["calls"] == {"ClaimTask": claims["ok"], "CompleteTask": claims["ok"]}
    assert len(claims["extra"]["agents"]) == 8
    assert claims["extra"]["queue_prefilled_tasks"] > 0
    assert rows["claim_complete"]["extra"]["cycles_per_s"] == rows["claim_complete"]["rpc_per_s"]

    batches = rows["batch_create_tasks"]
    assert batches["measurement"]["extra"]["verified"] == "BatchCreateTasks returned 1000 PENDING tasks"
    assert batches["measurement"]["extra"]["rows"] == 1000 * batches["measurement"]["ok"]
    assert batches["extra"]["rows_per_s"] > 0
    assert "rows/s" in batches["notes"][0]
    assert "claim_complete" in doc["table"] and "batch_create_tasks" in doc["table"]
    assert not doc["problems"]


def test_bench_mixed_with_warm_caches(bench_python: Path, servers: Servers, tmp_path: Path) -> None:
    doc = run_bench(bench_python, servers, tmp_path, "--scenario", "mixed", "--no-chart")
    [row] = doc["scenarios"]
    check_measured(row)
    assert row["generator"] == "python"
    assert any(note.startswith("warm caches") for note in row["notes"]), row["notes"]
    # The cache hit ratios are reported (not checked: a slow Redis reply on a busy machine may send
    # a read to PostgreSQL).
    assert any(note.startswith("l1 hits") for note in row["notes"]), row["notes"]
    refs = {ref["id"]: ref for ref in doc["references"]}
    assert row["naive_reference"] in refs and row["echo_reference"] in refs
    assert row["ratio_vs_naive"] > 0


def test_bench_same_rate(bench_python: Path, servers: Servers, tmp_path: Path) -> None:
    doc = run_bench(bench_python, servers, tmp_path, "--scenario", "same_rate", "--same-rates", "40,80", "--no-chart")
    [row] = doc["scenarios"]
    if not shutil.which("h2load"):
        # It needs h2load's --rps; without it the scenario says so instead of measuring something else.
        assert row["status"] == "skipped" and "h2load" in row["notes"][0], row
        return
    check_measured(row)
    runs = row["extra"]["same_rate"]
    # Per rate, agentstore, agentstore with its access log, and echo, one after the other.
    assert [(r["offered_rpc_per_s"], r["server"]) for r in runs] == [
        (rate, server) for rate in (40, 80) for server in ("agentstore", "agentstore, access log on", "echo")
    ]
    for run in runs:
        assert run["status"] == "ok" and run["errors"] == 0, run
        assert run["p50_ms"] is not None and run["p90_ms"] is not None and run["p99_ms"] is not None, run
        assert "--rps=" in run["measurement"]["extra"]["h2load_command"]
        assert run["rps_per_connection"] == run["offered_rpc_per_s"] / 2  # --connections 2
    assert any(note.startswith("p99 ") and "over echo at 80 RPC/s" in note for note in row["notes"]), row["notes"]
    assert "latency at the same offered load" in doc["table"]
    assert not doc["problems"]


def test_bench_queue_peers(bench_python: Path, servers: Servers, tmp_path: Path) -> None:
    doc = run_bench(bench_python, servers, tmp_path, "--scenario", "queue_peers", "--no-references", "--no-chart")
    [row] = doc["scenarios"]
    assert row["status"] == "ok", row
    peers_doc = row["extra"]["queue_peers"]
    # agentstore's side: the claim_complete and batch_create_tasks scenarios, run here since the
    # run did not include them.
    assert peers_doc["agentstore"]["claim_jobs_per_s"] > 0
    assert peers_doc["agentstore"]["bulk_rows_per_s"] > 0
    assert sum("measured by queue_peers" in note for note in row["notes"]) == 2, row["notes"]
    peers = {peer["name"]: peer for peer in peers_doc["peers"]}
    assert list(peers) == ["Graphile Worker", "Procrastinate"]
    # Procrastinate is in the bench's own environment; Graphile Worker needs node and npm, and
    # without them is reported as skipped with the reason, never dropped.
    expected = {
        "Procrastinate": "ok",
        "Graphile Worker": "ok" if shutil.which("npm") and shutil.which("node") else "skipped",
    }
    for name, peer in peers.items():
        assert peer["status"] == expected[name], peer
        if peer["status"] == "skipped":
            assert peer["reason"], peer
            assert any(note.startswith(f"{name} skipped: ") for note in row["notes"]), row["notes"]
            continue
        assert peer["version"]
        assert peer["claim_jobs_per_s"] > 0 and peer["bulk_rows_per_s"] > 0, peer
        assert peer["cpu_percent"] > 0 and peer["other_cpu_percent"] is not None, peer
        assert peer["raw"]["claim_complete"]["jobs"] > 0
        assert peer["raw"]["bulk_insert"]["rows"] % 1000 == 0 and peer["raw"]["bulk_insert"]["rows"] > 0
        assert peer["raw"]["ratios"]["claim_complete"] > 0 and peer["raw"]["ratios"]["batch_create_tasks"] > 0
        assert any(note.startswith(f"vs {name}: ") for note in row["notes"]), row["notes"]
    assert "queue peers" in doc["table"]
    assert not doc["problems"]
    # Every scratch database of the run, the peers' included, is gone again.
    assert bench_databases(servers.admin_url, doc["run_id"]) == []
