"""The access log's own line writer: the same JSON a `logging` record of agentstore.access would
give, escaped where a value can hold any text, written in batches (pure logic)."""

from __future__ import annotations

import asyncio
import json
import logging

from agentstore.logs import AccessLog, JsonFormatter

FIELDS = {
    "method": "/agentstore.v1.AgentService/GetAgent",
    "code": "NOT_FOUND",
    "reason": "AGENT_NOT_FOUND",
    "duration_ms": 1.234,
    "request_id": 'quote " backslash \\ newline \n tab \t ü \u2028',
    "tenant_id": "b4e1e0f2-8a1d-4a47-9a3e-1d2f1f0f0a11",
    "key_id": None,
    "peer": "ipv6:[::1]:50123",
}


async def test_a_line_is_what_the_json_formatter_would_write() -> None:
    written: list[bytes] = []
    log = AccessLog(write=written.append, flush_interval=60)
    log.line(**FIELDS)  # type: ignore[arg-type]
    log.flush()
    [data] = written
    ours = json.loads(data)

    record = logging.makeLogRecord({"name": "agentstore.access", "msg": "rpc", "levelname": "INFO", **FIELDS})
    theirs = json.loads(JsonFormatter().format(record))
    assert list(ours) == list(theirs)  # the same keys, in the same order
    assert {k: v for k, v in ours.items() if k != "ts"} == {k: v for k, v in theirs.items() if k != "ts"}
    assert ours["ts"].endswith("Z") and len(ours["ts"]) == len("2026-01-02T03:04:05.678Z")
    assert data.count(b"\n") == 1 and data.endswith(b"\n")  # one line, whatever the request id held


async def test_lines_go_out_together_after_the_interval() -> None:
    written: list[bytes] = []
    log = AccessLog(write=written.append, flush_interval=0.05)
    for _ in range(100):
        log.line(**FIELDS)  # type: ignore[arg-type]
    assert written == []
    await asyncio.sleep(0.2)
    assert len(written) == 1 and written[0].count(b"\n") == 100
