"""The benchmark run: servers up, scratch database seeded, scenarios measured, report written.

Every scenario starts its own `agentstore serve` (with the cache settings it needs), so CPU and
peak RSS belong to that scenario alone. The reference servers (bench/echo_server.py and
bench/naive_server.py) are measured through the same generator with the same workload; their
results are shared by the scenarios with the same workload and listed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentstore.v1 import (
    agent_pb2,
    agent_service_pb2,
    task_pb2,
    task_service_pb2,
    tenant_pb2,
    tenant_service_pb2,
    tenant_service_pb2_grpc,
)
from harness import h2load as h2
from harness.environment import (
    BENCH_DIR,
    Backends,
    ManagedProcess,
    Pinning,
    ScratchDatabase,
    UsageSampler,
    clear_redis_prefix,
    drop_quietly,
    free_port,
    rss_mib,
)
from harness.options import Options
from harness.pyload import (
    BATCH_CREATE_TASKS,
    BATCH_GET_AGENTS,
    CREATE_AGENT,
    GET_AGENT,
    LIST_AGENTS,
    BatchCreate,
    ClaimComplete,
    CreateUnique,
    FixedRequest,
    MixedZipf,
    UpdateWithEtag,
    Workload,
    agent_id,
    run_python_load,
    task_batch,
)
from harness.queue_peers import BATCH as PEER_BATCH
from harness.queue_peers import PEERS, WORKERS, run_peer
from harness.report import Reference, ScenarioResult, write_report
from harness.scenarios import SCENARIOS, skip_reason
from harness.stats import HALF_RATE_FRACTION, HalfRate, Measurement, SameRate, Usage

LIST_FILTER = 'status = IDLE AND capabilities:"python"'
LIST_PAGE = 50
CACHE_MODES: dict[str, dict[str, str]] = {
    "get_l1": {
        "AGENTSTORE_CACHE_L1_MAX_ENTRIES": "100000",
        "AGENTSTORE_CACHE_L1_TTL_SECONDS": "300",
        "AGENTSTORE_CACHE_L2_TTL_SECONDS": "600",
    },
    "get_l2": {
        "AGENTSTORE_CACHE_L1_MAX_ENTRIES": "0",
        "AGENTSTORE_CACHE_L2_TTL_SECONDS": "600",
    },
    "get_uncached": {
        "AGENTSTORE_CACHE_L1_MAX_ENTRIES": "0",
        "AGENTSTORE_CACHE_L2_TTL_SECONDS": "0",
    },
}
NAIVE_INDEX = "bench_naive_agents_by_id"
# The task scenarios: tasks per BatchCreateTasks, and the ClaimTask → CompleteTask workers.
TASK_BATCH = 1000
CLAIM_WORKERS = 8
# A 1,000-row batch holds a database connection for 100+ ms: with connections x streams (32) of
# them in flight the server's pool (10) runs dry (RESOURCE_EXHAUSTED) and nothing is gained.
BATCH_INFLIGHT = 4
# claim_complete fills the queue with this many tasks per second of run (warm-up included)
# before it starts; a refiller tops it up while the run goes on if it drops below a third.
QUEUE_TASKS_PER_SECOND = 1000
QUEUE_POLL_S = 1.0
TASKS_ONLY_NOTE = "agentstore only: the reference servers have no TaskService, so no ratios"
# Counted up to a limit: the poll runs on the PostgreSQL under test during the run, and a full
# count of the growing tasks table every 250 ms cost it ~45 ms each (profile_claims showed it).
PENDING_TASKS = """
SELECT count(*) FROM (
    SELECT 1 FROM tasks WHERE tenant_id = $1::uuid AND status = 'PENDING' AND required_capabilities = '{}' LIMIT $2
) AS pending
"""

SEED_AGENTS = """
INSERT INTO agents (tenant_id, id, name, role, kind, status, capabilities, metadata, last_heartbeat_time,
                    create_time, update_time)
SELECT $1::uuid,
       ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
       'agent-' || lpad(i::text, 7, '0'),
       'worker',
       'bench',
       (ARRAY['IDLE', 'BUSY', 'OFFLINE', 'ERROR'])[i % 4 + 1],
       CASE i % 3 WHEN 0 THEN ARRAY['python', 'sql'] WHEN 1 THEN ARRAY['go'] ELSE ARRAY['python', 'rust'] END,
       jsonb_build_object('region', CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, 'shard', i % 16),
       now(),
       now() - make_interval(secs => $2 - i),
       now() - make_interval(secs => $2 - i)
FROM generate_series(0, $2 - 1) AS i
"""


# Above this, the CPUs were busy with something else before the run started.
BUSY_WARNING_PERCENT = 15.0
# Above this much CPU of other work during a measurement (100 = one core), it is repeated.
NOISE_CPU_PERCENT = 20.0


def host_busy_percent(seconds: float = 1.0) -> float:
    """How busy every CPU together was over `seconds` (0..100), before the harness starts anything."""
    import psutil

    return float(psutil.cpu_percent(interval=seconds))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class FixedCall:
    """One pre-serialized request, and how to tell that its answer is right."""

    method: str
    payload: bytes
    check: Callable[[bytes], str]  # raises AssertionError when wrong, else describes the answer
    key: str  # what the references share, e.g. "GetAgent"
    headers: tuple[tuple[str, str], ...] = ()  # extra request metadata


class VerificationError(Exception):
    pass


class ScenarioSkipped(Exception):
    """The scenario cannot run on this machine (its message says why): reported as SKIPPED."""


def check_agent(expected_id: str | None) -> Callable[[bytes], str]:
    def check(raw: bytes) -> str:
        agent = agent_pb2.Agent.FromString(raw)
        assert agent.id, "the response has no agent id"
        if expected_id is not None:
            assert agent.id == expected_id, f"expected agent {expected_id}, got {agent.id}"
        return f"GetAgent returned agent {agent.id} ({agent.name})"

    return check


def check_list(strict: bool) -> Callable[[bytes], str]:
    def check(raw: bytes) -> str:
        page = agent_service_pb2.ListAgentsResponse.FromString(raw)
        assert len(page.agents) == LIST_PAGE, f"expected {LIST_PAGE} agents, got {len(page.agents)}"
        if strict:
            for agent in page.agents:
                assert agent.status == agent_pb2.AGENT_STATUS_IDLE, f"agent {agent.id} is not IDLE"
                assert "python" in agent.capabilities, f"agent {agent.id} lacks capability python"
        return f"ListAgents returned {len(page.agents)} agents matching the filter"

    return check


# --------------------------------------------------------------------------------------- servers


class Server:
    """A server under test or a reference server, and where to reach it."""

    def __init__(self, name: str, process: ManagedProcess, port: int, metrics_port: int | None = None) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.metrics_port = metrics_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[str, float]:
        """agentstore's Prometheus counters, keyed `name{label="value",...}`."""
        if self.metrics_port is None:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    async def wait_ready(self, *, health: bool, limit_s: float = 60.0) -> None:
        deadline = time.monotonic() + limit_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.process.exited()
                if code is not None:
                    raise RuntimeError(f"{self.name} exited with code {code}:\n{self.process.log_tail()}")
                try:
                    if health:
                        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    else:
                        await asyncio.wait_for(channel.channel_ready(), 1)
                        return
                except (grpc.aio.AioRpcError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} did not become ready in {limit_s:.0f}s:\n{self.process.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop)


def _delta(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key.startswith(prefix) and after[key] - before.get(key, 0.0) != 0
    }


def grpc_status_counts(delta: dict[str, float], method: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    marker = f'method="{method}"'
    for key, value in delta.items():
        if key.startswith("agentstore_rpc_total{") and marker in key:
            code = key.split('code="', 1)[1].split('"', 1)[0]
            counts[code] = counts.get(code, 0) + int(value)
    return counts


def cache_summary(delta: dict[str, float]) -> str | None:
    parts: list[str] = []
    for tier in ("l1", "l2"):
        hits = sum(v for k, v in delta.items() if k.startswith("agentstore_cache_hits_total") and f'tier="{tier}"' in k)
        misses = sum(
            v for k, v in delta.items() if k.startswith("agentstore_cache_misses_total") and f'tier="{tier}"' in k
        )
        if hits + misses:
            parts.append(f"{tier} hits {hits / (hits + misses):.1%}")
    loads = sum(v for k, v in delta.items() if k.startswith("agentstore_db_loads_total"))
    if parts or loads:
        parts.append(f"db loads {int(loads):,}")
    return ", ".join(parts) if parts else None


# ------------------------------------------------------------------------------------------- run


@dataclass
class Bench:
    opts: Options
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="agentstore-bench-")))
    pinning: Pinning = field(init=False)
    h2load: str | None = field(init=False)
    generator_note: str = field(init=False)
    backends: Backends | None = None
    db: ScratchDatabase | None = None
    platform_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    page_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    tenant_id: str = ""
    api_key: str = ""
    servers: list[Server] = field(default_factory=list)
    echo: Server | None = None
    naive: Server | None = None
    references: dict[str, Reference] = field(default_factory=dict)
    results: list[ScenarioResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    busy_before: float = 0.0

    def __post_init__(self) -> None:
        self.pinning = Pinning.choose(self.opts.server_cpus, self.opts.client_cpus)
        found = h2.find_h2load()
        if self.opts.generator == "python":
            self.h2load = None
            self.generator_note = "Python generator for every scenario (--generator python)"
        elif found is None:
            self.h2load = None
            self.generator_note = (
                "h2load not found (install nghttp2-client): fixed-request scenarios fall back to the Python generator"
            )
        else:
            self.h2load = found
            self.generator_note = f"h2load ({h2.h2load_version(found)}) for fixed-request scenarios"

    @property
    def redis_prefix(self) -> str:
        return f"bench-{self.tag}:"

    @property
    def authorization(self) -> str:
        return f"Bearer {self.api_key}"

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", self.authorization)]

    @property
    def inflight(self) -> int:
        return self.opts.connections * self.opts.streams

    @property
    def processes(self) -> int:
        return self.opts.client_processes or max(2, self.pinning.client_cpu_count())

    # -- lifecycle

    async def run(self) -> int:
        started = datetime.now(UTC)
        log(f"run {self.tag}: {self.generator_note}; {self.pinning.note}")
        self.busy_before = await asyncio.to_thread(host_busy_percent)
        if self.busy_before > BUSY_WARNING_PERCENT:
            log(f"the machine is {self.busy_before:.0f}% busy before the run (other work): expect noise")
        try:
            await self._setup()
            for name in self.opts.scenarios:
                await self._run_scenario(name)
        finally:
            await self._teardown()
        paths = write_report(self, started)
        for path in paths:
            log(f"wrote {path}")
        failed = [r.name for r in self.results if r.status == "error"]
        return 1 if failed else 0

    async def _setup(self) -> None:
        self.backends = await asyncio.to_thread(Backends.start, self.opts.database_url, self.opts.redis_url)
        log(f"backends: {self.backends.description}")
        self.db = await ScratchDatabase.create(self.backends.admin_url, self.tag)
        log(f"scratch database {self.db.name} migrated; app role {self.db.role}")
        server = await self.start_agentstore({}, "bootstrap")
        try:
            await self._create_tenant(server)
            await self._seed()
            # One real call proves the key, the tenant and the seed line up.
            async with grpc.aio.insecure_channel(server.address) as channel:
                raw = await channel.unary_unary(GET_AGENT)(
                    agent_service_pb2.GetAgentRequest(id=agent_id(0)).SerializeToString(),
                    metadata=self.metadata,
                    timeout=10,
                )
                check_agent(agent_id(0))(raw)
        finally:
            await self.stop_server(server)

    async def _teardown(self) -> None:
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                await self.stop_server(server)
        problem = await drop_quietly(self.db)
        if problem:
            self.problems.append(problem)
            log(problem)
        elif self.db is not None:
            log(f"dropped {self.db.name} and role {self.db.role}")
        if self.backends is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(clear_redis_prefix, self.backends.redis_url, self.redis_prefix)
            await asyncio.to_thread(self.backends.stop)
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def _create_tenant(self, server: Server) -> None:
        md = (("authorization", f"Bearer {self.platform_token}"),)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = tenant_service_pb2_grpc.TenantServiceStub(channel)
            tenant = await stub.CreateTenant(
                tenant_service_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(name=f"bench-{self.tag}")),
                metadata=md,
                timeout=10,
            )
            created = await stub.CreateApiKey(
                tenant_service_pb2.CreateApiKeyRequest(
                    tenant_id=tenant.id,
                    api_key=tenant_pb2.ApiKey(role=tenant_pb2.API_KEY_ROLE_WRITER, display_name="bench"),
                ),
                metadata=md,
                timeout=10,
            )
        self.tenant_id = tenant.id
        self.api_key = created.secret

    async def _seed(self) -> None:
        assert self.db is not None
        start = time.perf_counter()
        con = await asyncpg.connect(self.db.owner_url)
        try:
            async with con.transaction():
                # The tables force row-level security: a non-superuser owner writes inside its tenant.
                await con.execute("SELECT set_config('agentstore.tenant_id', $1, true)", self.tenant_id)
                await con.execute(SEED_AGENTS, self.tenant_id, self.opts.agents)
            await con.execute("ANALYZE agents")
        finally:
            await con.close()
        log(f"seeded {self.opts.agents:,} agents in {time.perf_counter() - start:.1f}s")

    # -- servers

    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTORE_")}

    async def start_agentstore(
        self, overrides: dict[str, str], label: str, *, wrapper: Sequence[str] = (), ready_s: float = 60.0
    ) -> Server:
        """`agentstore serve` with the bench's settings; `wrapper` goes before python (e.g. valgrind)."""
        assert self.db is not None and self.backends is not None
        port, metrics_port = free_port(), free_port()
        env = self._base_env()
        env.update(
            {
                "AGENTSTORE_DATABASE_URL": self.db.app_url,
                "AGENTSTORE_REDIS_URL": self.backends.redis_url,
                "AGENTSTORE_REDIS_KEY_PREFIX": self.redis_prefix,
                "AGENTSTORE_ACCESS_LOG": "false",
                "AGENTSTORE_LOG_LEVEL": "WARNING",
                "AGENTSTORE_LISTEN_ADDRESS": f"127.0.0.1:{port}",
                "AGENTSTORE_PLATFORM_ADMIN_TOKEN": self.platform_token,
                "AGENTSTORE_PAGE_TOKEN_SECRET": self.page_secret,
                "AGENTSTORE_DB_POOL_MIN_SIZE": str(self.opts.pool_size),
                "AGENTSTORE_DB_POOL_MAX_SIZE": str(self.opts.pool_size),
                "AGENTSTORE_METRICS_PORT": str(metrics_port),
                "AGENTSTORE_SHUTDOWN_GRACE_SECONDS": "1",
                "AGENTSTORE_REFLECTION_ENABLED": "false",
            }
        )
        env.update(self.opts.server_env)
        env.update(overrides)
        argv = [*self.pinning.server_prefix(), *wrapper, sys.executable, "-m", "agentstore", "serve"]
        process = ManagedProcess(f"agentstore serve ({label})", argv, env, self.workdir / f"agentstore-{label}.log")
        return await self._start(Server(process.name, process, port, metrics_port), health=True, ready_s=ready_s)

    async def _start(self, server: Server, *, health: bool, ready_s: float = 60.0) -> Server:
        server.process.start()
        self.servers.append(server)
        try:
            await server.wait_ready(health=health, limit_s=ready_s)
        except BaseException:
            await self.stop_server(server)
            raise
        return server

    async def stop_server(self, server: Server) -> None:
        await server.stop()
        if server in self.servers:
            self.servers.remove(server)

    async def echo_server(self) -> Server:
        """The echo reference, started once and shared by every scenario."""
        if self.echo is None:
            self.echo = await self.start_echo()
        return self.echo

    async def start_echo(self, *, wrapper: Sequence[str] = (), ready_s: float = 60.0, label: str = "echo") -> Server:
        port = free_port()
        script = BENCH_DIR / "echo_server.py"
        argv = [*self.pinning.server_prefix(), *wrapper, sys.executable, str(script), "--port", str(port)]
        process = ManagedProcess("echo_server", argv, self._base_env(), self.workdir / f"{label}.log")
        return await self._start(Server("echo", process, port), health=False, ready_s=ready_s)

    async def naive_server(self) -> Server:
        assert self.db is not None
        if self.naive is None:
            port = free_port()
            script = BENCH_DIR / "naive_server.py"
            argv = [
                *self.pinning.server_prefix(),
                sys.executable,
                str(script),
                "--port",
                str(port),
                "--database-url",
                self.db.owner_url,
                "--pool-size",
                str(self.opts.pool_size),
                "--tenant-id",
                self.tenant_id,
            ]
            process = ManagedProcess("naive_server", argv, self._base_env(), self.workdir / "naive.log")
            self.naive = await self._start(Server("naive", process, port), health=False)
        return self.naive

    async def _naive_index(self, create: bool) -> None:
        assert self.db is not None
        con = await asyncpg.connect(self.db.owner_url)
        try:
            if create:
                await con.execute(f"CREATE INDEX IF NOT EXISTS {NAIVE_INDEX} ON agents (id)")
                await con.execute("ANALYZE agents")
            else:
                await con.execute(f"DROP INDEX IF EXISTS {NAIVE_INDEX}")
        finally:
            await con.close()

    # -- measuring

    async def verify(self, server: Server, call: FixedCall) -> str:
        async with grpc.aio.insecure_channel(server.address) as channel:
            try:
                raw = await channel.unary_unary(call.method)(
                    call.payload, metadata=[*self.metadata, *call.headers], timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                raise VerificationError(f"{call.method} failed: {exc.code().name} {exc.details()}") from None
        try:
            return call.check(raw)
        except Exception as exc:
            raise VerificationError(f"{call.method} answered wrongly: {exc}") from None

    async def measure_fixed(
        self,
        server: Server,
        call: FixedCall,
        *,
        requests: int | None = None,
        rps_per_connection: float | None = None,
    ) -> Measurement:
        """The fixed request through h2load (or the Python generator when h2load is missing).

        `rps_per_connection` rate-limits every h2load connection (--rps); h2load only.
        """
        verified = await self.verify(server, call)
        if self.h2load is None:
            if rps_per_connection is not None:
                raise RuntimeError("rate-limited runs need h2load")
            workload = FixedRequest(method=call.method, payload=call.payload)
            m = await self.measure_python(
                server, workload, rpc=call.method.rpartition("/")[2], requests=requests, headers=call.headers
            )
            m.extra["verified"] = verified
            return m
        before = await asyncio.to_thread(server.metrics)
        frame = self.workdir / f"{call.key}.frame"
        frame.write_bytes(h2.grpc_frame(call.payload))
        log_file = self.workdir / f"h2load-{server.name}-{call.key}.log"
        log_file.unlink(missing_ok=True)
        command = [
            *self.pinning.client_prefix(),
            *h2.build_command(
                self.h2load,
                f"http://{server.address}{call.method}",
                frame,
                [*h2.grpc_headers(self.authorization), *call.headers],
                connections=self.opts.connections,
                streams=self.opts.streams,
                threads=self.pinning.client_cpu_count(),
                log_file=log_file,
                duration=None if requests is not None else self.opts.duration,
                warmup=None if requests is not None else self.opts.warmup,
                requests=requests,
                rps_per_connection=rps_per_connection,
            ),
        ]
        sampler = UsageSampler(server.pid, [srv.pid for srv in self.servers])
        limit = (requests / 100 if requests else self.opts.duration + self.opts.warmup) + 120
        task = asyncio.create_task(h2.run_h2load(command, log_file, limit_s=limit))
        # After the warm-up (or once h2load has started), so the generator is among the sampled processes.
        await asyncio.sleep(self.opts.warmup if requests is None and self.opts.warmup else 0.1)
        sampler.start()
        try:
            result = await task
        finally:
            usage = sampler.stop()
        after = await asyncio.to_thread(server.metrics)
        delta = _delta(before, after, "agentstore_")
        statuses = grpc_status_counts(delta, call.method)
        # h2load resets the streams still in flight when the duration ends: the server sees those
        # as CANCELLED. Up to connections x streams of them are that, not failures.
        cancelled_at_end = min(statuses.get("CANCELLED", 0), self.inflight) if requests is None else 0
        grpc_errors = sum(v for k, v in statuses.items() if k != "OK") - cancelled_at_end
        errors = result.transport_errors + grpc_errors
        ok = max(0, result.done - errors)
        notes: list[str] = []
        error_codes = {k: v for k, v in statuses.items() if k != "OK"}
        if cancelled_at_end:
            error_codes["CANCELLED"] -= cancelled_at_end
            if not error_codes["CANCELLED"]:
                del error_codes["CANCELLED"]
        if result.transport_errors:
            error_codes["HTTP/transport"] = result.transport_errors
        return Measurement(
            target=server.name,
            generator="h2load",
            rpc=call.method.rpartition("/")[2],
            duration_s=result.duration_s if requests is not None else self.opts.duration,
            requests=result.done,
            ok=ok,
            errors=errors,
            rpc_per_s=result.req_per_s * ok / result.done if result.done else 0.0,
            latency=result.latency,
            usage=usage,
            error_codes=error_codes,
            notes=notes,
            extra={
                "verified": verified,
                # Reference servers have no metrics: h2load cannot see grpc-status, the verified call is the check.
                "grpc_status_counts": statuses if server.metrics_port is not None else None,
                "cancelled_at_end_of_run": cancelled_at_end,
                "h2load_command": " ".join(command).replace(self.api_key, "<api key>"),
                "h2load_log_lines": result.log_lines,
                "connections": self.opts.connections,
                "streams_per_connection": self.opts.streams,
                "rps_per_connection": rps_per_connection,
                "server_metrics_delta": delta or None,
            },
        )

    def warmup_for(self, workload: Workload) -> float:
        if workload.steady_state:
            return max(self.opts.warmup, self.opts.duration)
        return self.opts.warmup

    async def measure_python(
        self,
        server: Server,
        workload: Workload,
        *,
        rpc: str,
        requests: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        inflight: int | None = None,
        processes: int | None = None,
    ) -> Measurement:
        before = await asyncio.to_thread(server.metrics)
        sampler = UsageSampler(server.pid, [srv.pid for srv in self.servers])
        try:
            result = await run_python_load(
                server.address,
                [*self.metadata, *headers],
                workload,
                processes=processes or self.processes,
                inflight_total=inflight or self.inflight,
                duration=None if requests is not None else self.opts.duration,
                requests=requests,
                warmup=0 if requests is not None else self.warmup_for(workload),
                command_prefix=self.pinning.client_prefix(),
                workdir=self.workdir / f"py-{server.name}-{uuid.uuid4().hex[:6]}",
                on_go=sampler.start,
            )
        finally:
            usage = sampler.stop()
        after = await asyncio.to_thread(server.metrics)
        delta = _delta(before, after, "agentstore_")
        return Measurement(
            target=server.name,
            generator="python",
            rpc=rpc,
            duration_s=result.window_s,
            requests=result.requests,
            ok=result.ok,
            errors=result.errors,
            rpc_per_s=result.rpc_per_s,
            latency=result.latency,
            usage=usage,
            error_codes=result.error_codes,
            error_sample=result.error_sample,
            extra={
                "workload": workload.describe(),
                "calls": result.calls,
                "ops": result.ops,
                "ops_per_s": result.ops / result.window_s if result.window_s else 0.0,
                "processes": result.processes,
                "inflight_per_process": result.inflight_per_process,
                "server_metrics_delta": delta or None,
            },
        )

    async def steady(self, measure: Callable[[], Awaitable[Measurement]], label: str) -> Measurement:
        """Measure; while other work took more than NOISE_CPU_PERCENT of the machine, measure again.

        Keeps the quietest attempt (at most --noise-retries extra ones) and notes the retries.
        """
        best = latest = await measure()
        attempts = 1
        while (best.usage.other_cpu_percent or 0) > NOISE_CPU_PERCENT and attempts <= self.opts.noise_retries:
            log(f"  {label}: other work used {latest.usage.other_cpu_percent or 0:.0f}% CPU during the run; again")
            latest = await measure()
            attempts += 1
            if (latest.usage.other_cpu_percent or 0) < (best.usage.other_cpu_percent or 0):
                best = latest
        if attempts > 1:
            best.extra["attempts"] = attempts
            best.notes.append(f"best of {attempts} (other work on the machine)")
        return best

    async def measure_half_rate(self, server: Server, call: FixedCall, saturated: Measurement, label: str) -> HalfRate:
        """A second h2load run, rate-limited to HALF_RATE_FRACTION of the saturated RPC/s: its latency.

        h2load's --rps is per connection, so the target is divided by the number of connections.
        """
        target = saturated.rpc_per_s * HALF_RATE_FRACTION
        half = HalfRate(
            saturated_rpc_per_s=saturated.rpc_per_s,
            target_rpc_per_s=target,
            rps_per_connection=target / self.opts.connections,
            connections=self.opts.connections,
        )
        if saturated.generator != "h2load" or self.h2load is None:
            half.error = "needs h2load (the Python generator cannot limit its rate)"
        elif half.rps_per_connection < 0.001:
            half.error = f"saturated rate too low ({saturated.rpc_per_s:.2f} RPC/s)"
        if half.error is not None:
            half.skipped = True
            log(f"  {label} at half saturation: skipped, {half.error}")
            return half
        try:
            half.measurement = await self.steady(
                lambda: self.measure_fixed(server, call, rps_per_connection=half.rps_per_connection),
                f"{label} at half saturation",
            )
        except (Exception, VerificationError) as exc:
            half.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"  {label} at half saturation failed: {exc}")
            return half
        m = half.measurement
        log(
            f"  {label} at half saturation ({target:,.0f} RPC/s target): {m.rpc_per_s:,.0f} RPC/s, "
            f"p50 {m.latency.p50_ms or 0:.2f} p95 {m.latency.p95_ms or 0:.2f} p99 {m.latency.p99_ms or 0:.2f} ms, "
            f"{m.errors} errors"
        )
        return half

    async def reference(
        self,
        target: str,
        key: str,
        scenario: str,
        *,
        call: FixedCall | None = None,
        workload: Workload | None = None,
        half_rate: bool = False,
    ) -> Reference | None:
        if not self.opts.references:
            return None
        generator = "h2load" if call is not None and self.h2load is not None else "python"
        ref_id = f"{target}:{key}:{generator}"
        ref = self.references.get(ref_id)
        if ref is None:
            ref = Reference(ref_id, target, key, generator, generator_cores=self.pinning.client_cpu_count())
            self.references[ref_id] = ref
            try:
                server = await (self.echo_server() if target == "echo" else self.naive_server())
                if target == "naive":
                    await self._naive_index(create=True)
                try:
                    if call is not None:
                        ref.measurement = await self.steady(lambda: self.measure_fixed(server, call), ref_id)
                        if half_rate and self.opts.half_rate:
                            ref.half_rate = await self.measure_half_rate(server, call, ref.measurement, ref_id)
                    else:
                        assert workload is not None
                        ref.measurement = await self.steady(
                            lambda: self.measure_python(server, workload, rpc=key), ref_id
                        )
                finally:
                    if target == "naive":
                        await self._naive_index(create=False)
                log(f"  reference {ref_id}: {ref.measurement.rpc_per_s:,.0f} RPC/s, {ref.measurement.errors} errors")
            except (Exception, VerificationError) as exc:
                ref.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log(f"  reference {ref_id} failed: {exc}")
        ref.used_by.append(scenario)
        return ref

    # -- scenarios

    async def _run_scenario(self, name: str) -> None:
        scenario = SCENARIOS[name]
        result = ScenarioResult(name, scenario.description)
        reason = skip_reason(scenario)
        if reason is not None:
            result.status = "skipped"
            result.notes.append(reason)
            log(f"{name}: SKIPPED ({reason})")
            self.results.append(result)
            return
        log(f"{name}: {scenario.description}")
        try:
            if name in CACHE_MODES:
                await self._get(result)
            elif name == "same_rate":
                await self._same_rate(result)
            elif name == "list_filtered":
                await self._list(result)
            elif name == "create":
                await self._python_scenario(result, CreateUnique(tag=f"bench-{self.tag}"), "CreateAgent", {})
            elif name == "update_etag":
                await self._update_etag(result)
            elif name == "claim_complete":
                await self._claim_complete(result)
            elif name == "batch_create_tasks":
                await self._batch_create_tasks(result)
            elif name == "queue_peers":
                await self._queue_peers(result)
            elif name == "mixed":
                await self._mixed(result)
            elif name == "memory":
                await self._memory(result)
            else:  # pragma: no cover - skip_reason covers every other name
                raise RuntimeError(f"no driver for {name}")
            result.status = "ok"
        except ScenarioSkipped as exc:
            result.status = "skipped"
            result.notes.append(str(exc))
            log(f"{name}: SKIPPED ({exc})")
        except (Exception, VerificationError) as exc:
            result.status = "error"
            result.notes.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            result.extra["error"] = str(exc)
            log(f"{name}: ERROR {exc}")
        result.compute_ratios()
        if result.measurement is not None:
            m = result.measurement
            log(
                f"{name}: {m.rpc_per_s:,.0f} RPC/s, p99 {m.latency.p99_ms or 0:.2f} ms, {m.errors} errors"
                + (f", {result.ratio_vs_echo:.2f}x echo" if result.ratio_vs_echo is not None else "")
                + (f", {result.ratio_vs_naive:.2f}x naive" if result.ratio_vs_naive is not None else "")
            )
        self.results.append(result)

    async def _agentstore_measure(
        self,
        result: ScenarioResult,
        env: dict[str, str],
        run: Callable[[Server], Any],
        half_rate_call: FixedCall | None = None,
    ) -> None:
        """Measure agentstore; with `half_rate_call`, then again at half the saturated rate (same server)."""
        server = await self.start_agentstore(env, result.name)
        try:
            result.measurement = await self.steady(lambda: run(server), result.name)
            if half_rate_call is not None and self.opts.half_rate:
                result.half_rate = await self.measure_half_rate(server, half_rate_call, result.measurement, result.name)
        finally:
            await self.stop_server(server)
        result.notes.extend(result.measurement.notes)
        delta = result.measurement.extra.get("server_metrics_delta") or {}
        summary = cache_summary(delta)
        if summary:
            result.notes.append(summary)
        if result.measurement.error_sample:
            result.notes.append(result.measurement.error_sample)
        if result.half_rate is not None:
            result.notes.append(result.half_rate.note())

    async def _get(self, result: ScenarioResult) -> None:
        env = CACHE_MODES[result.name]
        target = agent_id(0)
        call = FixedCall(
            GET_AGENT, agent_service_pb2.GetAgentRequest(id=target).SerializeToString(), check_agent(target), "GetAgent"
        )
        measured = call
        if result.name == "get_uncached":
            # With one hot key, single-flight would merge concurrent loads; no-cache makes every
            # RPC one query, like the naive server's.
            measured = dataclasses.replace(call, headers=(("cache-control", "no-cache"),))
            result.notes.append("cache-control: no-cache")
        await self._agentstore_measure(
            result, env, lambda server: self.measure_fixed(server, measured), half_rate_call=measured
        )
        result.echo = await self.reference(
            "echo", "GetAgent", result.name, call=dataclasses.replace(call, check=check_agent(None)), half_rate=True
        )
        result.naive = await self.reference("naive", "GetAgent", result.name, call=call, half_rate=True)

    async def _same_rate(self, result: ScenarioResult) -> None:
        """GetAgent from L1 and echo at the same offered rates: the latency agentstore adds at each.

        Per rate, agentstore (the bench's config: access log off), agentstore with the access log
        on (its default) and echo run one after the other, so the three are measured close in time.
        """
        if self.h2load is None:
            raise ScenarioSkipped("needs h2load (--rps); the Python generator cannot hold a rate")
        target = agent_id(0)
        call = FixedCall(
            GET_AGENT, agent_service_pb2.GetAgentRequest(id=target).SerializeToString(), check_agent(target), "GetAgent"
        )
        echo_call = dataclasses.replace(call, check=check_agent(None))
        servers: list[tuple[str, Server, FixedCall]] = [
            ("agentstore", await self.start_agentstore(CACHE_MODES["get_l1"], "same-rate"), call),
            (
                "agentstore, access log on",
                await self.start_agentstore(
                    {**CACHE_MODES["get_l1"], "AGENTSTORE_ACCESS_LOG": "true", "AGENTSTORE_LOG_LEVEL": "INFO"},
                    "same-rate-access-log",
                ),
                call,
            ),
            ("echo", await self.echo_server(), echo_call),
        ]
        runs: list[SameRate] = []
        try:
            for rate in self.opts.same_rates:
                for label, server, fixed in servers:
                    run = SameRate(label, float(rate), rate / self.opts.connections)
                    try:
                        run.measurement = await self.steady(
                            functools.partial(
                                self.measure_fixed, server, fixed, rps_per_connection=run.rps_per_connection
                            ),
                            f"{label} at {rate:,} RPC/s",
                        )
                    except (Exception, VerificationError) as exc:
                        run.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        log(f"  {label} at {rate:,} RPC/s failed: {exc}")
                    else:
                        m = run.measurement
                        log(
                            f"  {label} at {rate:,} RPC/s: {m.rpc_per_s:,.0f} RPC/s, p50 {m.latency.p50_ms or 0:.2f} "
                            f"p90 {m.latency.p90_ms or 0:.2f} p99 {m.latency.p99_ms or 0:.2f} ms, {m.errors} errors"
                        )
                    runs.append(run)
        finally:
            for label, server, _ in servers:
                if label != "echo":
                    await self.stop_server(server)
        result.extra["same_rate"] = [run.to_json() for run in runs]
        failed = [f"{r.server} at {r.offered_rpc_per_s:,.0f}" for r in runs if r.measurement is None]
        if failed:
            raise RuntimeError(f"same_rate runs failed: {', '.join(failed)}")
        # The table's row is agentstore at the middle rate (2,000 RPC/s by default: the bar).
        middle = self.opts.same_rates[len(self.opts.same_rates) // 2]
        by_key = {(r.server, r.offered_rpc_per_s): r for r in runs}
        result.measurement = by_key["agentstore", float(middle)].measurement
        for rate in self.opts.same_rates:
            mine, echo = by_key["agentstore", float(rate)], by_key["echo", float(rate)]
            assert mine.measurement is not None and echo.measurement is not None
            p99 = (mine.measurement.latency.p99_ms or 0) - (echo.measurement.latency.p99_ms or 0)
            result.notes.append(f"p99 {p99:+.2f} ms over echo at {rate:,} RPC/s")
        result.notes.append(f"row: agentstore at {middle:,} RPC/s offered; table 'at the same offered load' below")
        if any(r.fell_behind for r in runs):
            result.notes.append("a run fell behind its offered rate: its percentiles flatter it (see the table)")

    async def _list(self, result: ScenarioResult) -> None:
        request = agent_service_pb2.ListAgentsRequest(page_size=LIST_PAGE, filter=LIST_FILTER)
        call = FixedCall(LIST_AGENTS, request.SerializeToString(), check_list(strict=True), "ListAgents")
        await self._agentstore_measure(result, {}, lambda server: self.measure_fixed(server, call))
        result.echo = await self.reference(
            "echo", "ListAgents", result.name, call=dataclasses.replace(call, check=check_list(strict=False))
        )
        result.notes.append("naive server has no ListAgents")

    async def _python_scenario(self, result: ScenarioResult, workload: Workload, rpc: str, env: dict[str, str]) -> None:
        await self._agentstore_measure(result, env, lambda server: self.measure_python(server, workload, rpc=rpc))
        result.echo = await self.reference("echo", result.name, result.name, workload=workload)

    async def _update_etag(self, result: ScenarioResult) -> None:
        slots = self.processes * -(-self.inflight // self.processes)
        first = self.opts.agents // 2
        per_slot = max(1, min(4, (self.opts.agents - first) // slots))
        if (self.opts.agents - first) < slots:
            raise RuntimeError(f"update_etag needs at least {2 * slots} seeded agents (--agents)")
        workload = UpdateWithEtag(first_index=first, agents_per_slot=per_slot)
        await self._python_scenario(result, workload, "GetAgent+UpdateAgent", {})
        result.notes.append("2 RPCs per op, both counted")

    async def _read_every_agent(self, server: Server) -> None:
        """BatchGetAgents over every seeded agent, so the caches start as a long-running service's
        would: all agents in L2, the most recently read in L1."""
        async with grpc.aio.insecure_channel(server.address) as channel:
            batch_get = channel.unary_unary(
                BATCH_GET_AGENTS, response_deserializer=agent_service_pb2.BatchGetAgentsResponse.FromString
            )
            for first in range(0, self.opts.agents, 1000):
                ids = [agent_id(i) for i in range(first, min(first + 1000, self.opts.agents))]
                request = agent_service_pb2.BatchGetAgentsRequest(ids=ids).SerializeToString()
                response = await batch_get(request, metadata=self.metadata, timeout=60)
                if len(response.agents) != len(ids):
                    raise VerificationError(f"BatchGetAgents returned {len(response.agents)} of {len(ids)} agents")

    async def _mixed(self, result: ScenarioResult) -> None:
        workload = MixedZipf(agents=self.opts.agents)

        async def run(server: Server) -> Measurement:
            await self._read_every_agent(server)
            return await self.measure_python(server, workload, rpc="GetAgent/UpdateAgent")

        await self._agentstore_measure(result, {}, run)
        result.echo = await self.reference("echo", result.name, result.name, workload=workload)
        result.notes.append("warm caches: every agent read once before the run, then a warm-up as long as the run")
        result.naive = await self.reference("naive", "mixed", result.name, workload=workload)
        if self.opts.agents != 100_000:
            result.notes.append(f"over {self.opts.agents:,} agents")

    # -- task scenarios (agentstore only: neither reference server has a TaskService)

    async def _batch_create(self, channel: grpc.aio.Channel, payload: bytes) -> int:
        """One BatchCreateTasks; checks the answer and returns how many PENDING tasks it created."""
        try:
            raw = await channel.unary_unary(BATCH_CREATE_TASKS)(payload, metadata=self.metadata, timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise VerificationError(f"BatchCreateTasks failed: {exc.code().name} {exc.details()}") from None
        created = task_service_pb2.BatchCreateTasksResponse.FromString(raw).tasks
        expected = len(task_service_pb2.BatchCreateTasksRequest.FromString(payload).requests)
        if len(created) != expected or any(t.status != task_pb2.TASK_STATUS_PENDING or not t.id for t in created):
            raise VerificationError(f"BatchCreateTasks answered wrongly: {len(created)} tasks for {expected} creates")
        return len(created)

    async def _batch_create_tasks(self, result: ScenarioResult) -> None:
        workload = BatchCreate(batch=TASK_BATCH, tag=f"bench-{self.tag}-batch")
        inflight = min(self.inflight, BATCH_INFLIGHT)

        async def run(server: Server) -> Measurement:
            async with grpc.aio.insecure_channel(server.address) as channel:
                created = await self._batch_create(channel, task_batch(TASK_BATCH, f"bench-{self.tag}-verify"))
            m = await self.measure_python(server, workload, rpc="BatchCreateTasks", inflight=inflight)
            rows = m.ok * TASK_BATCH  # all of a batch or none of it
            m.extra.update(
                {
                    "verified": f"BatchCreateTasks returned {created} PENDING tasks",
                    "rows_per_rpc": TASK_BATCH,
                    "rows": rows,
                    "rows_per_s": rows / m.duration_s if m.duration_s else 0.0,
                }
            )
            return m

        await self._agentstore_measure(result, {}, run)
        assert result.measurement is not None
        rows_per_s = result.measurement.extra["rows_per_s"]
        result.extra["rows_per_s"] = rows_per_s
        result.notes.insert(
            0, f"{rows_per_s:,.0f} rows/s ({TASK_BATCH:,} tasks per RPC, no request_id; {inflight} RPCs in flight)"
        )
        result.notes.append(TASKS_ONLY_NOTE)

    async def _claim_agents(self, server: Server) -> list[str]:
        """CLAIM_WORKERS IDLE agents without capabilities, created through the server under test."""
        ids: list[str] = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            create = channel.unary_unary(CREATE_AGENT, response_deserializer=agent_pb2.Agent.FromString)
            for i in range(CLAIM_WORKERS):
                agent = agent_pb2.Agent(
                    name=f"bench-{self.tag}-claimer-{i}-{uuid.uuid4().hex[:6]}",
                    role="worker",
                    kind="bench-claim",
                    status=agent_pb2.AGENT_STATUS_IDLE,
                )
                request = agent_service_pb2.CreateAgentRequest(agent=agent, request_id=str(uuid.uuid4()))
                try:
                    created = await create(request.SerializeToString(), metadata=self.metadata, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    raise VerificationError(f"CreateAgent failed: {exc.code().name} {exc.details()}") from None
                ids.append(created.id)
        return ids

    async def _pending_tasks(self, con: asyncpg.Connection, up_to: int) -> int:
        """Claimable tasks waiting, counted up to `up_to`."""
        return int(await con.fetchval(PENDING_TASKS, self.tenant_id, up_to))

    async def _fill_queue(self, channel: grpc.aio.Channel, con: asyncpg.Connection, target: int, payload: bytes) -> int:
        """BatchCreateTasks until at least `target` claimable tasks wait; returns how many were added."""
        added = 0
        missing = target - await self._pending_tasks(con, target)
        while added < missing:
            added += await self._batch_create(channel, payload)
        return added

    async def _measure_claims(self, server: Server, agents: list[str], processes: int) -> Measurement:
        assert self.db is not None
        target = max(2, math.ceil(self.opts.duration + self.opts.warmup)) * QUEUE_TASKS_PER_SECOND
        payload = task_batch(TASK_BATCH, f"bench-{self.tag}-queue")
        con = await asyncpg.connect(self.db.owner_url)
        # The tables force row-level security: the owner reads inside the bench tenant.
        await con.execute("SELECT set_config('agentstore.tenant_id', $1, false)", self.tenant_id)
        refilled = 0
        stop = asyncio.Event()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                prefilled = await self._fill_queue(channel, con, target, payload)
                pending_before = await self._pending_tasks(con, 10 * target)

                async def refill() -> None:
                    nonlocal refilled
                    while not stop.is_set():
                        if await self._pending_tasks(con, target // 3) < target // 3:
                            refilled += await self._fill_queue(channel, con, target // 2, payload)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), QUEUE_POLL_S)

                refiller = asyncio.create_task(refill())
                try:
                    m = await self.measure_python(
                        server,
                        ClaimComplete(agent_ids=tuple(agents)),
                        rpc="ClaimTask+CompleteTask",
                        inflight=len(agents),
                        processes=processes,
                    )
                finally:
                    stop.set()
                    await refiller
            pending_after = await self._pending_tasks(con, 10 * target)
        finally:
            await con.close()
        m.extra.update(
            {
                "cycles_per_s": m.rpc_per_s,
                "rpc_per_s_both_calls": 2 * m.rpc_per_s,
                "agents": agents,
                "queue_prefilled_tasks": prefilled,
                "queue_pending_before": pending_before,
                "queue_refilled_tasks": refilled,
                "queue_pending_after": pending_after,
            }
        )
        if refilled:
            m.notes.append(f"queue refilled with {refilled:,} tasks during the run (BatchCreateTasks)")
        return m

    async def _claim_complete(self, result: ScenarioResult) -> None:
        # Every generator slot is one agent: the processes must divide the workers evenly.
        processes = max(p for p in range(1, CLAIM_WORKERS + 1) if CLAIM_WORKERS % p == 0 and p <= self.processes)
        agents: list[str] = []

        async def run(server: Server) -> Measurement:
            if not agents:
                agents.extend(await self._claim_agents(server))
            return await self._measure_claims(server, agents, processes)

        await self._agentstore_measure(result, {}, run)
        assert result.measurement is not None
        result.extra["cycles_per_s"] = result.measurement.rpc_per_s
        result.notes.insert(
            0,
            f"RPC/s = cycles/s, latency = one ClaimTask + CompleteTask cycle; {CLAIM_WORKERS} agents, "
            f"one in-flight cycle each ({processes} processes)",
        )
        result.notes.append(TASKS_ONLY_NOTE)

    async def _agentstore_queue(self, name: str, result: ScenarioResult) -> ScenarioResult:
        """This run's claim_complete or batch_create_tasks, measured now if the run did not include it."""
        for done in self.results:
            if done.name == name and done.status == "ok" and done.measurement is not None:
                return done
        own = ScenarioResult(name, SCENARIOS[name].description)
        await (self._claim_complete(own) if name == "claim_complete" else self._batch_create_tasks(own))
        own.status = "ok"
        result.notes.append(f"agentstore's {name} measured by queue_peers (not in this run's scenarios)")
        return own

    async def _queue_peers(self, result: ScenarioResult) -> None:
        assert self.backends is not None
        claims = await self._agentstore_queue("claim_complete", result)
        batches = await self._agentstore_queue("batch_create_tasks", result)
        assert claims.measurement is not None and batches.measurement is not None
        mine = {
            "claim_jobs_per_s": claims.extra["cycles_per_s"],
            "bulk_rows_per_s": batches.extra["rows_per_s"],
            "claim_other_cpu_percent": claims.measurement.usage.other_cpu_percent,
            "bulk_other_cpu_percent": batches.measurement.usage.other_cpu_percent,
        }
        peers = []
        for peer in PEERS:
            log(f"  {peer.name}: claim -> complete with {WORKERS} workers, then bulk insert")
            found = await run_peer(
                peer,
                self.backends.admin_url,
                self.tag,
                duration=self.opts.duration,
                warmup=self.opts.warmup,
                prefix=self.pinning.server_prefix(),
            )
            if found.status == "ok":
                log(
                    f"  {peer.name} {found.version}: {found.claim_jobs_per_s:,.0f} jobs/s, "
                    f"{found.bulk_rows_per_s:,.0f} rows/s"
                )
            else:
                log(f"  {peer.name}: {found.status.upper()} ({found.reason})")
            peers.append(found)
        for found in peers:
            if found.status != "ok":
                result.notes.append(f"{found.name} {found.status}: {found.reason}")
                continue
            claim = mine["claim_jobs_per_s"] / found.claim_jobs_per_s if found.claim_jobs_per_s else None
            bulk = mine["bulk_rows_per_s"] / found.bulk_rows_per_s if found.bulk_rows_per_s else None
            found.raw["ratios"] = {"claim_complete": claim, "batch_create_tasks": bulk}
            result.notes.append(
                f"vs {found.name}: claim_complete {claim or 0:.2f}x, batch_create_tasks {bulk or 0:.2f}x"
            )
            if found.drained_early:
                result.notes.append(
                    f"{found.name} ran out of jobs before the window ended: its jobs/s is a lower bound"
                )
        result.extra["queue_peers"] = {
            "workers": WORKERS,
            "rows_per_call": PEER_BATCH,
            "agentstore": mine,
            "peers": [found.to_json() for found in peers],
        }

    async def _memory(self, result: ScenarioResult) -> None:
        first, second = self.opts.memory_requests
        target = agent_id(0)
        call = FixedCall(
            GET_AGENT, agent_service_pb2.GetAgentRequest(id=target).SerializeToString(), check_agent(target), "GetAgent"
        )
        server = await self.start_agentstore({}, result.name)
        try:
            warm = max(1000, first // 10)
            await self.measure_fixed(server, call, requests=warm)
            rss_warm = rss_mib(server.pid)
            m1 = await self.measure_fixed(server, call, requests=first)
            rss_first = rss_mib(server.pid)
            m2 = await self.measure_fixed(server, call, requests=second - first)
            rss_second = rss_mib(server.pid)
        finally:
            await self.stop_server(server)
        total_errors = m1.errors + m2.errors
        m2.errors = total_errors
        m2.usage = Usage(
            cpu_percent=m2.usage.cpu_percent,
            peak_rss_mib=max(m1.usage.peak_rss_mib or 0, m2.usage.peak_rss_mib or 0) or None,
            rss_end_mib=rss_second,
            db_cpu_percent=m2.usage.db_cpu_percent,
            host_cpu_percent=m2.usage.host_cpu_percent,
            generator_cpu_percent=m2.usage.generator_cpu_percent,
            other_cpu_percent=m2.usage.other_cpu_percent,
        )
        ratio = rss_second / rss_first if rss_first else None
        m2.extra.update(
            {
                "rss_mib_after_warmup": rss_warm,
                f"rss_mib_after_{first}": rss_first,
                f"rss_mib_after_{second}": rss_second,
                "rss_ratio": ratio,
                "warmup_requests": warm,
            }
        )
        result.measurement = m2
        result.notes.append(
            f"RSS {rss_first:.1f} MiB after {first:,}, {rss_second:.1f} MiB after {second:,} GetAgent"
            f" (ratio {ratio:.3f})"
            if ratio is not None
            else "RSS unavailable"
        )


async def run_bench(opts: Options) -> int:
    bench = Bench(opts)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await bench.run()


def run_sync(opts: Options) -> int:
    try:
        return asyncio.run(run_bench(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("agentstore bench: interrupted; servers stopped and the scratch database dropped", file=sys.stderr)
        return 130
