"""Everything the benchmark starts and must stop again: servers, the scratch database, processes.

The scratch database and its login role are created like the test suite's (migrations applied as
the owner, a LOGIN role that is a member of agentstore_app), and dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import psutil

from harness.stats import Usage

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_DIR.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replace_dsn(url: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    """The same PostgreSQL server as another user or database."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        userinfo, hostport = "", parts.netloc
    old_user, _, old_password = userinfo.partition(":")
    new_user = quote(user, safe="") if user is not None else old_user
    new_password = quote(password, safe="") if password is not None else old_password
    netloc = parts.netloc
    if new_user:
        netloc = new_user + (f":{new_password}" if new_password else "") + f"@{hostport}"
    path = f"/{quote(database, safe='')}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def apply_migrations(owner_url: str) -> None:
    """`agentstore migrate apply` as the schema owner: the harness uses the product's commands, not its modules."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTORE_")}
    env["AGENTSTORE_MIGRATIONS_DATABASE_URL"] = owner_url
    env["AGENTSTORE_MIGRATIONS_DIR"] = str(REPO_ROOT / "migrations")
    done = subprocess.run(
        [sys.executable, "-m", "agentstore", "migrate", "apply"], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"agentstore migrate apply failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


# ------------------------------------------------------------------------------ external servers


@dataclass
class Backends:
    """PostgreSQL (an admin URL: may create databases and roles) and Redis, maybe embedded."""

    admin_url: str
    redis_url: str
    description: str
    _started: list[Any] = field(default_factory=list)
    _tmp: str | None = None

    @classmethod
    def start(cls, admin_url: str | None, redis_url: str | None) -> Backends:
        started: list[Any] = []
        tmp: str | None = None
        parts: list[str] = []
        try:
            if not admin_url or not redis_url:
                # Without URLs, the embedded servers of `agentstore dev` (the `embedded` extra).
                from agentstore.devtools.embedded import EmbeddedPostgres, EmbeddedRedis

                tmp = tempfile.mkdtemp(prefix="agentstore-bench-")
                if not admin_url:
                    pg = EmbeddedPostgres(Path(tmp) / "pg", require_password=True)
                    admin_url = pg.start()
                    started.append(pg)
                    parts.append("embedded PostgreSQL")
                if not redis_url:
                    rd = EmbeddedRedis(Path(tmp) / "redis", append_only=False)
                    redis_url = rd.start()
                    started.append(rd)
                    parts.append("embedded Redis")
        except BaseException:
            for server in reversed(started):
                with contextlib.suppress(Exception):
                    server.stop()
            raise
        if "embedded PostgreSQL" not in parts:
            parts.insert(0, "PostgreSQL from AGENTSTORE_BENCH_DATABASE_URL")
        if "embedded Redis" not in parts:
            parts.append("Redis from AGENTSTORE_BENCH_REDIS_URL")
        assert admin_url and redis_url
        return cls(admin_url, redis_url, ", ".join(parts), started, tmp)

    def stop(self) -> None:
        for server in reversed(self._started):
            with contextlib.suppress(Exception):
                server.stop()
        self._started.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


@dataclass
class ScratchDatabase:
    name: str
    role: str
    password: str
    admin_url: str
    owner_url: str
    app_url: str
    created_role: bool = False

    @classmethod
    async def create(cls, admin_url: str, tag: str) -> ScratchDatabase:
        name = f"agentstore_bench_{tag}"
        role = f"agentstore_bench_{tag}"
        password = uuid.uuid4().hex
        owner_url = replace_dsn(admin_url, database=name)
        db = cls(name, role, password, admin_url, owner_url, replace_dsn(owner_url, user=role, password=password))
        con = await asyncpg.connect(admin_url)
        try:
            await con.execute(f'CREATE DATABASE "{name}"')
            await con.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            db.created_role = True
        finally:
            await con.close()
        await asyncio.to_thread(apply_migrations, owner_url)
        con = await asyncpg.connect(owner_url)
        try:
            await con.execute(f"GRANT agentstore_app TO {role}")
        finally:
            await con.close()
        return db

    async def drop(self) -> None:
        con = await asyncpg.connect(self.admin_url)
        try:
            await con.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            if self.created_role:
                await con.execute(f"DROP ROLE IF EXISTS {self.role}")
        finally:
            await con.close()


async def drop_quietly(db: ScratchDatabase | None) -> str | None:
    if db is None:
        return None
    try:
        await asyncio.wait_for(db.drop(), 60)
    except Exception as exc:
        return f"could not drop the scratch database {db.name}: {exc}"
    return None


def clear_redis_prefix(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


# ----------------------------------------------------------------------------------- processes


@dataclass
class Pinning:
    """taskset prefixes for the server side and the generator side (empty when unpinned)."""

    server_cpus: str
    client_cpus: str
    enabled: bool
    note: str

    @classmethod
    def choose(cls, server_cpus: str | None, client_cpus: str | None) -> Pinning:
        count = os.cpu_count() or 1
        server = server_cpus if server_cpus is not None else ("0" if count >= 2 else "")
        client = client_cpus if client_cpus is not None else ("1" if count >= 2 else "")
        if not server and not client:
            return cls("", "", False, f"unpinned ({count} CPU{'s' if count != 1 else ''})")
        if shutil.which("taskset") is None:
            return cls("", "", False, "taskset not found: server and generator run unpinned")
        note = f"server (and reference servers) on CPU {server or 'any'}, generator on CPU {client or 'any'} (taskset)"
        return cls(server, client, True, note)

    def server_prefix(self) -> list[str]:
        return ["taskset", "-c", self.server_cpus] if self.enabled and self.server_cpus else []

    def client_prefix(self) -> list[str]:
        return ["taskset", "-c", self.client_cpus] if self.enabled and self.client_cpus else []

    def client_cpu_count(self) -> int:
        if not (self.enabled and self.client_cpus):
            return os.cpu_count() or 1
        return len(parse_cpu_list(self.client_cpus))


def parse_cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.extend(range(int(low), int(high) + 1))
        else:
            cpus.append(int(part))
    return cpus


class ManagedProcess:
    """A server subprocess in its own session (Ctrl-C on the terminal does not reach it)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


# ------------------------------------------------------------------------------------- sampling


class _CpuGroup:
    """CPU seconds used by a fixed set of processes since `start()` (processes that exit are lost)."""

    def __init__(self, procs: Sequence[psutil.Process]) -> None:
        self._procs = {p.pid: p for p in procs}
        self._t0: dict[int, float] = {}

    def _now(self) -> dict[int, float]:
        found: dict[int, float] = {}
        for pid, proc in list(self._procs.items()):
            try:
                times = proc.cpu_times()
                found[pid] = float(times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self._procs.pop(pid, None)
        return found

    def start(self) -> None:
        self._t0 = self._now()

    def baseline(self) -> dict[int, float]:
        return dict(self._t0)

    def current(self) -> dict[int, float]:
        return self._now()

    def used(self) -> float | None:
        if not self._t0:
            return None
        now = self._now()
        return sum(now[pid] - self._t0[pid] for pid in now if pid in self._t0)


class UsageSampler:
    """CPU % (over the window) and peak RSS of the server process, sampled from a thread.

    Also measures, over the same window, the CPU of every PostgreSQL and Redis process it can see,
    of the generator (this process's other children), and of the whole machine: on a small machine
    they all share the same cores, and what is left over is other work that makes the run noisy.
    """

    def __init__(self, pid: int, servers: Sequence[int] = (), interval: float = 0.1) -> None:
        self._pid = pid
        self._proc = psutil.Process(pid)
        self._servers = {pid, *servers}
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._last_rss = 0
        self._t0 = 0.0
        self._host0 = 0.0
        self._server = _CpuGroup([self._proc])
        self._backends = _CpuGroup([])
        self._generator = _CpuGroup([])
        self._me = psutil.Process(os.getpid())
        self._me0 = 0.0

    @staticmethod
    def _host_busy() -> float:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        return float(sum(times) - idle)

    def _own_and_reaped(self) -> float:
        """CPU of this process plus every child it has reaped (RUSAGE_CHILDREN)."""
        t = self._me.cpu_times()
        return float(t.user + t.system + t.children_user + t.children_system)

    def _generator_seconds(self) -> float | None:
        """The generator's CPU in the window, including workers that exited (and were reaped) before stop().

        A reaped child's whole lifetime lands in RUSAGE_CHILDREN, so what it had used before the
        window (its warm-up) is subtracted again. This process's own CPU counts as generator too.
        """
        before = self._generator.baseline()
        alive = self._generator.current()
        reaped_before = sum(cpu for pid, cpu in before.items() if pid not in alive)
        alive_used = sum(alive[pid] - before[pid] for pid in alive if pid in before)
        return max(0.0, self._own_and_reaped() - self._me0 - reaped_before) + alive_used

    def start(self) -> None:
        backends = [
            proc
            for proc in psutil.process_iter(["name"])
            if proc.info.get("name") in ("postgres", "postmaster", "redis-server")
        ]
        self._backends = _CpuGroup(backends)
        me = psutil.Process(os.getpid())
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            children = []
        self._generator = _CpuGroup([c for c in children if c.pid not in self._servers])
        self._me = me
        self._t0 = time.perf_counter()
        self._host0 = self._host_busy()
        self._me0 = self._own_and_reaped()
        for group in (self._server, self._backends, self._generator):
            group.start()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="usage-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            rss = int(self._proc.memory_info().rss)
        except psutil.NoSuchProcess:
            return
        self._last_rss = rss
        self._peak = max(self._peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> Usage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()
        elapsed = time.perf_counter() - self._t0

        def percent(seconds: float | None) -> float | None:
            return seconds / elapsed * 100 if seconds is not None and elapsed > 0 else None

        server = percent(self._server.used())
        backends = percent(self._backends.used())
        generator = percent(self._generator_seconds())
        host = percent(self._host_busy() - self._host0)
        other = None
        if host is not None and server is not None:
            other = max(0.0, host - server - (backends or 0.0) - (generator or 0.0))
        mib = 1024 * 1024
        return Usage(
            cpu_percent=server,
            peak_rss_mib=self._peak / mib if self._peak else None,
            rss_end_mib=self._last_rss / mib if self._last_rss else None,
            db_cpu_percent=backends,
            host_cpu_percent=host,
            generator_cpu_percent=generator,
            other_cpu_percent=other,
        )


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
