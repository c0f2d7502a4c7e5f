"""One JSON line per log event, with stable keys. Secrets and payload values never go in."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str, separators=(",", ":"))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLog:
    """The access log: one JSON line per RPC, with the keys and order JsonFormatter gives a record
    of the `agentstore.access` logger, made without the logging machinery.

    Through `logging` a line cost about 40 µs of CPU (a LogRecord, the `extra` merge, the handler,
    the formatter's walk over the record, a write and flush), a quarter of a GetAgent answered from
    L1. Here it is a formatted string (JSON-escaped only where a value can hold any text), and the
    lines of the last `flush_interval` seconds (or 64 KiB of them) go out in one write.
    """

    def __init__(self, write: Callable[[bytes], object] | None = None, flush_interval: float = 0.05) -> None:
        self._write = write or _stderr_write
        self._interval = flush_interval
        self._lines: list[str] = []
        self._size = 0
        self._second = -1
        self._stamp = ""

    def line(
        self,
        method: str,
        code: str,
        reason: str,
        duration_ms: float,
        request_id: str,
        tenant_id: str | None,
        key_id: str | None,
        peer: str,
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        text = (
            f'{{"ts":"{self._stamp}.{int((now - second) * 1000):03d}Z","level":"info","logger":"agentstore.access",'
            f'"msg":"rpc","method":{_json(method)},"code":"{code}","reason":"{reason}",'
            f'"duration_ms":{duration_ms},"request_id":{_json(request_id)},'
            f'"tenant_id":{_json(tenant_id) if tenant_id else "null"},"key_id":{_json(key_id) if key_id else "null"},'
            f'"peer":{_json(peer)}}}\n'
        )
        if not self._lines:
            asyncio.get_running_loop().call_later(self._interval, self.flush)
        self._lines.append(text)
        self._size += len(text)
        if self._size >= 65536:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            data = "".join(self._lines).encode()
            self._lines.clear()
            self._size = 0
            self._write(data)


_json = json.JSONEncoder(ensure_ascii=True).encode


def _stderr_write(data: bytes) -> None:
    sys.stderr.flush()  # what `logging` wrote before goes first
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()
