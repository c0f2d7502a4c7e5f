"""Reference server: the simplest correct way to serve GetAgent and UpdateAgent from PostgreSQL.

One asyncpg `pool.fetchrow` per RPC and nothing else: no auth, no tenancy checks, no cache, no
metrics, no access log, no retries, no explicit transaction. GetAgent selects the agent by id
alone; UpdateAgent is one plain `UPDATE ... RETURNING` by id that sets last_heartbeat_time
(from the request, else now()), bumps version and update_time. It connects as the schema owner.
The benchmark harness runs it against the same scratch database as agentstore, with a plain
btree index on agents(id) that it creates just for the naive runs.

    python bench/naive_server.py --port 50062 --database-url postgresql://postgres@127.0.0.1/db

`--tenant-id` only sets agentstore.tenant_id for the session, so the row-level security the
schema forces still lets a non-superuser owner see the rows; a superuser bypasses it anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import uuid
from datetime import UTC
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format

from agentstore.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc

COLUMNS = (
    "id, name, role, kind, status, capabilities, metadata::text AS metadata, last_heartbeat_time,"
    " create_time, update_time, version"
)
GET_AGENT = f"SELECT {COLUMNS} FROM agents WHERE id = $1"
UPDATE_AGENT = f"""
UPDATE agents SET last_heartbeat_time = coalesce($2, now()), version = version + 1, update_time = now()
WHERE id = $1
RETURNING {COLUMNS}
"""
STATUS = {
    "IDLE": agent_pb2.AGENT_STATUS_IDLE,
    "BUSY": agent_pb2.AGENT_STATUS_BUSY,
    "OFFLINE": agent_pb2.AGENT_STATUS_OFFLINE,
    "ERROR": agent_pb2.AGENT_STATUS_ERROR,
}


def to_agent(row: Any) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=str(row["id"]),
        name=row["name"],
        role=row["role"],
        kind=row["kind"],
        status=STATUS.get(row["status"], agent_pb2.AGENT_STATUS_UNSPECIFIED),
        capabilities=row["capabilities"],
        etag=f'"{row["version"]}"',
    )
    json_format.Parse(row["metadata"], agent.metadata)
    if row["last_heartbeat_time"] is not None:
        agent.last_heartbeat_time.FromDatetime(row["last_heartbeat_time"])
    agent.create_time.FromDatetime(row["create_time"])
    agent.update_time.FromDatetime(row["update_time"])
    return agent


def parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class NaiveAgentService(agent_service_pb2_grpc.AgentServiceServicer):
    """One fetchrow per RPC; the RPCs not overridden answer UNIMPLEMENTED (the generated base class)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def GetAgent(self, request: agent_service_pb2.GetAgentRequest, context: Any) -> agent_pb2.Agent:
        agent_id = parse_uuid(request.id)
        if agent_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id must be a UUID")
        row = await self._pool.fetchrow(GET_AGENT, agent_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such agent")
        return to_agent(row)

    async def UpdateAgent(self, request: agent_service_pb2.UpdateAgentRequest, context: Any) -> agent_pb2.Agent:
        agent_id = parse_uuid(request.agent.id)
        if agent_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent.id must be a UUID")
        heartbeat = (
            request.agent.last_heartbeat_time.ToDatetime(tzinfo=UTC)
            if request.agent.HasField("last_heartbeat_time")
            else None
        )
        row = await self._pool.fetchrow(UPDATE_AGENT, agent_id, heartbeat)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such agent")
        return to_agent(row)


async def serve(port: int, database_url: str, pool_size: int, tenant_id: str | None) -> None:
    settings = {"application_name": "agentstore-bench-naive"}
    if tenant_id:
        settings["agentstore.tenant_id"] = tenant_id
    pool = await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size, server_settings=settings)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(NaiveAgentService(pool), server)  # type: ignore[abstract]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise SystemExit(f"naive_server: cannot listen on 127.0.0.1:{port}")
    await server.start()
    print(f"naive_server listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50062)
    parser.add_argument("--database-url", required=True, help="the schema owner's URL of the benchmark database")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--tenant-id", default=None, help="sets agentstore.tenant_id for the session (see above)")
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port, args.database_url, args.pool_size, args.tenant_id))


if __name__ == "__main__":
    main()
