"""The Python load generator: several processes, each with its own channel and event loop.

Used for workloads whose requests vary (unique names, Zipf keys, read-then-update) and as the
fallback for fixed requests where h2load is missing. Each worker is a plain subprocess
(`python -m harness.worker SPEC RESULT`) so it can be pinned with taskset and never
imports the parent's __main__. The protocol on its pipes: the worker warms up and prints
`ready`, waits for `go` on stdin, runs for the duration (or its share of a request count),
pickles a WorkerResult to RESULT and prints `done`.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import pickle
import random
import sys
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2

from agentstore.v1 import agent_pb2, agent_service_pb2, task_service_pb2
from harness.stats import Latencies

GET_AGENT = "/agentstore.v1.AgentService/GetAgent"
LIST_AGENTS = "/agentstore.v1.AgentService/ListAgents"
CREATE_AGENT = "/agentstore.v1.AgentService/CreateAgent"
UPDATE_AGENT = "/agentstore.v1.AgentService/UpdateAgent"
BATCH_GET_AGENTS = "/agentstore.v1.AgentService/BatchGetAgents"
BATCH_CREATE_TASKS = "/agentstore.v1.TaskService/BatchCreateTasks"
CLAIM_TASK = "/agentstore.v1.TaskService/ClaimTask"
COMPLETE_TASK = "/agentstore.v1.TaskService/CompleteTask"

CALL_TIMEOUT_S = 30.0


def agent_id(index: int) -> str:
    """The id of seeded agent `index` (the seeding SQL builds the same UUIDs)."""
    return f"00000000-0000-4000-8000-{index:012x}"


# ----------------------------------------------------------------------------------- recording


class Recorder:
    """Per-worker accounting: latencies of successful calls, error codes, calls per RPC."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)
        self.latencies = array("d")
        self.errors: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.error_sample = ""
        self.recording = False

    async def call(
        self, name: str, method: grpc.aio.UnaryUnaryMultiCallable, request: Any, *, timed: bool = True
    ) -> Any | None:
        """One call; its latency is kept unless `timed` is false (a step of a cycle timed by `completed`)."""
        start = time.perf_counter()
        try:
            response = await method(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if self.recording:
                self.errors[exc.code().name] += 1
                self.calls[name] += 1
                if not self.error_sample:
                    self.error_sample = f"{name}: {exc.code().name} {exc.details()}"
            return None
        if self.recording:
            if timed:
                self.latencies.append(time.perf_counter() - start)
            self.calls[name] += 1
        return response

    def completed(self, start: float) -> None:
        """A multi-call operation that began at `start` (perf_counter) succeeded: keep its latency."""
        if self.recording:
            self.latencies.append(time.perf_counter() - start)


# ----------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A picklable description of what every in-flight slot does, one operation at a time."""

    # Whether the harness warms up for as long as it measures (at least --warmup), so that a
    # workload over many keys is measured with caches in their steady state, not while they fill.
    steady_state = False

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        """Build stubs and per-process state (runs in the worker, after unpickling)."""

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _raw(channel: grpc.aio.Channel, method: str, parse: Callable[[bytes], Any] | None = None) -> Any:
    # No serializer: requests go out as the given bytes; responses stay bytes unless parsed.
    return channel.unary_unary(method, request_serializer=None, response_deserializer=parse)


@dataclass
class FixedRequest(Workload):
    """The same serialized request again and again (what h2load does), responses not parsed."""

    method: str = GET_AGENT
    payload: bytes = b""

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        self._call = _raw(channel, self.method)
        self._name = self.method.rpartition("/")[2]

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        await rec.call(self._name, self._call, self.payload)

    def describe(self) -> str:
        return f"fixed {self.method.rpartition('/')[2]}"


@dataclass
class CreateUnique(Workload):
    """CreateAgent with a unique name (and a fresh request_id) per call."""

    tag: str = "bench"

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        self._call = _raw(channel, CREATE_AGENT)
        self._worker = worker
        # Fresh per worker process, so a repeated measurement never reuses a name.
        self._nonce = uuid.uuid4().hex[:8]

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        agent = agent_pb2.Agent(
            name=f"{self.tag}-{self._nonce}-w{self._worker}-s{slot}-{seq}",
            role="worker",
            kind="bench-create",
            status=agent_pb2.AGENT_STATUS_IDLE,
            capabilities=["bench", "create"],
        )
        agent.metadata.update({"region": "eu", "worker": self._worker})
        request = agent_service_pb2.CreateAgentRequest(agent=agent, request_id=str(uuid.uuid4()))
        await rec.call("CreateAgent", self._call, request.SerializeToString())


@dataclass
class UpdateWithEtag(Workload):
    """GetAgent, then UpdateAgent with the etag it returned (ETAG_MISMATCH counts as an error).

    Every in-flight slot of every worker owns `agents_per_slot` seeded agents of its own, so no two
    slots ever race for one agent and every conditional update is expected to succeed.
    """

    first_index: int = 0
    agents_per_slot: int = 4

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        self._get = _raw(channel, GET_AGENT, agent_pb2.Agent.FromString)
        self._update = _raw(channel, UPDATE_AGENT)
        self._base = self.first_index + worker * slots * self.agents_per_slot
        self._mask = field_mask_pb2.FieldMask(paths=["status"])

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        index = self._base + slot * self.agents_per_slot + seq % self.agents_per_slot
        key = agent_id(index)
        current = await rec.call("GetAgent", self._get, agent_service_pb2.GetAgentRequest(id=key).SerializeToString())
        if current is None:
            return
        status = (
            agent_pb2.AGENT_STATUS_BUSY
            if current.status != agent_pb2.AGENT_STATUS_BUSY
            else (agent_pb2.AGENT_STATUS_IDLE)
        )
        request = agent_service_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=key, etag=current.etag, status=status), update_mask=self._mask
        )
        await rec.call("UpdateAgent", self._update, request.SerializeToString())

    def describe(self) -> str:
        return "GetAgent then UpdateAgent(etag)"


@dataclass
class MixedZipf(Workload):
    """90% GetAgent / 10% UpdateAgent (heartbeat, no etag) over `agents` keys drawn Zipf(s)."""

    steady_state = True

    agents: int = 100_000
    zipf_s: float = 1.1
    update_fraction: float = 0.1
    seed: int = 42
    draws: int = 1 << 16

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        self._get = _raw(channel, GET_AGENT)
        self._update = _raw(channel, UPDATE_AGENT)
        # The same rank → key permutation in every worker: the hot keys are shared, not clustered.
        perm = list(range(self.agents))
        random.Random(self.seed).shuffle(perm)
        cumulative = list(itertools.accumulate(1.0 / (k**self.zipf_s) for k in range(1, self.agents + 1)))
        total = cumulative[-1]
        rng = random.Random(self.seed * 1000 + worker)
        self._keys = [perm[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(self.draws)]
        self._is_update = [rng.random() < self.update_fraction for _ in range(self.draws)]
        self._get_payloads: dict[int, bytes] = {}
        self._mask = field_mask_pb2.FieldMask(paths=["last_heartbeat_time"])
        self._cursor = itertools.count(worker * 7919)

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        n = next(self._cursor) % self.draws
        index = self._keys[n]
        if self._is_update[n]:
            agent = agent_pb2.Agent(id=agent_id(index))
            agent.last_heartbeat_time.GetCurrentTime()
            request = agent_service_pb2.UpdateAgentRequest(agent=agent, update_mask=self._mask)
            await rec.call("UpdateAgent", self._update, request.SerializeToString())
            return
        payload = self._get_payloads.get(index)
        if payload is None:
            payload = agent_service_pb2.GetAgentRequest(id=agent_id(index)).SerializeToString()
            self._get_payloads[index] = payload
        await rec.call("GetAgent", self._get, payload)

    def describe(self) -> str:
        updates = round(self.update_fraction * 100)
        return f"{100 - updates}% GetAgent / {updates}% UpdateAgent, Zipf({self.zipf_s}) over {self.agents} agents"


def task_batch(size: int, tag: str) -> bytes:
    """A serialized BatchCreateTasksRequest of `size` small tasks (no request_id, no capabilities)."""
    request = task_service_pb2.BatchCreateTasksRequest()
    for i in range(size):
        task = request.requests.add().task
        task.title = f"{tag}-{i}"
        task.priority = i % 4
        task.payload.update({"kind": "bench", "n": i})
    return request.SerializeToString()


@dataclass
class BatchCreate(Workload):
    """BatchCreateTasks of `batch` small tasks per call: the same pre-serialized request every time.

    No request_id, so every call inserts `batch` fresh rows (ids are server-assigned); the response
    (the created tasks) is not parsed.
    """

    batch: int = 1000
    tag: str = "bench"

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        self._call = _raw(channel, BATCH_CREATE_TASKS)
        self._payload = task_batch(self.batch, f"{self.tag}-w{worker}")

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        await rec.call("BatchCreateTasks", self._call, self._payload)

    def describe(self) -> str:
        return f"BatchCreateTasks of {self.batch} tasks"


@dataclass
class ClaimComplete(Workload):
    """ClaimTask then CompleteTask with its lease token: one operation, timed as one cycle.

    Every in-flight slot of every worker is one agent of `agent_ids` (so the generator must run
    exactly len(agent_ids) slots in total). A claim that finds the queue empty (NOT_FOUND) or a
    completion that lost its lease counts as one error; a cycle's latency is kept only when both
    calls succeeded.
    """

    agent_ids: tuple[str, ...] = ()
    lease_seconds: int = 60

    def setup(self, channel: grpc.aio.Channel, worker: int, workers: int, slots: int) -> None:
        self._claim = _raw(channel, CLAIM_TASK, task_service_pb2.ClaimTaskResponse.FromString)
        self._complete = _raw(channel, COMPLETE_TASK)
        first = worker * slots
        if first + slots > len(self.agent_ids):
            raise ValueError(f"{workers} workers x {slots} slots need more than {len(self.agent_ids)} agents")
        lease = duration_pb2.Duration(seconds=self.lease_seconds)
        self._claims = [
            task_service_pb2.ClaimTaskRequest(
                agent_id=self.agent_ids[first + slot], lease_duration=lease
            ).SerializeToString()
            for slot in range(slots)
        ]
        self._result = struct_pb2.Struct()
        self._result.update({"ok": True, "worker": worker})

    async def op(self, rec: Recorder, slot: int, seq: int) -> None:
        start = time.perf_counter()
        claimed = await rec.call("ClaimTask", self._claim, self._claims[slot], timed=False)
        if claimed is None:
            return
        request = task_service_pb2.CompleteTaskRequest(
            task_id=claimed.task.id, lease_token=claimed.lease_token, result=self._result
        )
        if await rec.call("CompleteTask", self._complete, request.SerializeToString(), timed=False) is not None:
            rec.completed(start)

    def describe(self) -> str:
        return f"ClaimTask then CompleteTask, {len(self.agent_ids)} agents (one op = one cycle)"


# ------------------------------------------------------------------------------------ the worker


@dataclass
class WorkerSpec:
    index: int
    workers: int
    address: str
    metadata: list[tuple[str, str]]
    workload: Workload
    inflight: int
    duration: float | None
    requests: int | None
    warmup: float


@dataclass
class WorkerResult:
    index: int
    window_s: float
    latencies: array[float]
    errors: dict[str, int]
    calls: dict[str, int]
    ops: int
    error_sample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


async def _drive(spec: WorkerSpec, rec: Recorder, *, seconds: float | None, ops: int | None, seq0: int) -> int:
    """Run every slot until the time is up or `ops` operations were started; returns ops done."""
    deadline = time.perf_counter() + seconds if seconds is not None else None
    counter = itertools.count(seq0)
    started = 0
    done = 0

    async def slot_loop(slot: int) -> None:
        nonlocal started, done
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if ops is not None:
                if started >= ops:
                    return
                started += 1
            await spec.workload.op(rec, slot, next(counter))
            done += 1

    await asyncio.gather(*(slot_loop(slot) for slot in range(spec.inflight)))
    return done


async def _worker(spec: WorkerSpec, result_path: Path) -> None:
    rec = Recorder(spec.metadata)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(spec.address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        spec.workload.setup(channel, spec.index, spec.workers, spec.inflight)
        if spec.warmup > 0:
            await _drive(spec, rec, seconds=spec.warmup, ops=None, seq0=10_000_000)
        loop = asyncio.get_running_loop()
        print("ready", flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return
        rec.recording = True
        start = time.perf_counter()
        ops = None
        if spec.requests is not None:
            share, rest = divmod(spec.requests, spec.workers)
            ops = share + (1 if spec.index < rest else 0)
        done = await _drive(spec, rec, seconds=spec.duration, ops=ops, seq0=0)
        window = time.perf_counter() - start
    result = WorkerResult(
        index=spec.index,
        window_s=window,
        latencies=rec.latencies,
        errors=dict(rec.errors),
        calls=dict(rec.calls),
        ops=done,
        error_sample=rec.error_sample,
    )
    tmp = result_path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.replace(result_path)
    print("done", flush=True)


def worker_main(argv: Sequence[str]) -> int:
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec: WorkerSpec = pickle.loads(spec_path.read_bytes())
    try:
        import uvloop

        uvloop.run(_worker(spec, result_path))
    except ImportError:
        asyncio.run(_worker(spec, result_path))
    return 0


# ------------------------------------------------------------------------------------ the parent


@dataclass
class PyLoadResult:
    requests: int
    ok: int
    errors: int
    error_codes: dict[str, int]
    error_sample: str
    window_s: float
    rpc_per_s: float
    latency: Latencies
    calls: dict[str, int]
    ops: int
    processes: int
    inflight_per_process: int


async def run_python_load(
    address: str,
    metadata: Sequence[tuple[str, str]],
    workload: Workload,
    *,
    processes: int,
    inflight_total: int,
    duration: float | None,
    requests: int | None,
    warmup: float,
    command_prefix: Sequence[str],
    workdir: Path,
    on_go: Callable[[], None] | None = None,
    ready_timeout: float = 60.0,
) -> PyLoadResult:
    """Start the workers, release them together, and merge what they measured."""
    processes = max(1, processes)
    inflight = max(1, -(-inflight_total // processes))
    specs = [
        WorkerSpec(index, processes, address, list(metadata), workload, inflight, duration, requests, warmup)
        for index in range(processes)
    ]
    spec_paths, results, logs = _prepare(workdir, specs)
    procs: list[asyncio.subprocess.Process] = []
    try:
        for index, spec_path in enumerate(spec_paths):
            result_path, log = results[index], logs[index]
            procs.append(
                await asyncio.create_subprocess_exec(
                    *command_prefix,
                    sys.executable,
                    "-m",
                    "harness.worker",
                    str(spec_path),
                    str(result_path),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                )
            )
        for index, proc in enumerate(procs):
            await _expect_line(proc, "ready", ready_timeout + warmup, workdir / f"worker-{index}.log")
        if on_go is not None:
            on_go()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        limit = (duration or 0) + 120.0 + (requests or 0) / 200.0
        for index, proc in enumerate(procs):
            await _expect_line(proc, "done", limit, workdir / f"worker-{index}.log")
            await asyncio.wait_for(proc.wait(), 30)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for log in logs:
            log.close()
    return _merge(_read_results(results), processes, inflight)


def _prepare(workdir: Path, specs: Sequence[WorkerSpec]) -> tuple[list[Path], list[Path], list[BinaryIO]]:
    workdir.mkdir(parents=True, exist_ok=True)
    spec_paths: list[Path] = []
    results: list[Path] = []
    logs: list[BinaryIO] = []
    for spec in specs:
        spec_path = workdir / f"worker-{spec.index}.spec"
        spec_path.write_bytes(pickle.dumps(spec))
        spec_paths.append(spec_path)
        result_path = workdir / f"worker-{spec.index}.result"
        result_path.unlink(missing_ok=True)
        results.append(result_path)
        logs.append((workdir / f"worker-{spec.index}.log").open("wb"))
    return spec_paths, results, logs


def _read_results(paths: Sequence[Path]) -> list[WorkerResult]:
    return [pickle.loads(path.read_bytes()) for path in paths]


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def _expect_line(proc: asyncio.subprocess.Process, word: str, limit_s: float, log: Path) -> None:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), limit_s)
    except TimeoutError:
        line = b""
    if line.strip() != word.encode():
        raise RuntimeError(f"load generator worker did not report {word!r} (got {line!r}):\n{_tail(log)}")


def _merge(parts: Sequence[WorkerResult], processes: int, inflight: int) -> PyLoadResult:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    sample = ""
    window = 0.0
    ops = 0
    for part in parts:
        latencies.extend(part.latencies)
        errors.update(part.errors)
        calls.update(part.calls)
        sample = sample or part.error_sample
        window = max(window, part.window_s)
        ops += part.ops
    ok = len(latencies)
    error_count = sum(errors.values())
    return PyLoadResult(
        requests=ok + error_count,
        ok=ok,
        errors=error_count,
        error_codes=dict(errors),
        error_sample=sample,
        window_s=window,
        rpc_per_s=ok / window if window > 0 else 0.0,
        latency=Latencies.of_seconds(latencies),
        calls=dict(calls),
        ops=ops,
        processes=processes,
        inflight_per_process=inflight,
    )
