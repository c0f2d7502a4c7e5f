"""Reference server: the ceiling of a Python grpc.aio server on this machine.

It answers agentstore.v1.AgentService with prebuilt responses and does nothing else: no auth,
no database, no cache, no metrics, no logging. GetAgent, CreateAgent and UpdateAgent return one
prebuilt Agent; ListAgents returns one prebuilt page of 50 agents. Every other RPC is
UNIMPLEMENTED. The benchmark harness drives it through the same generator as agentstore, so its
RPC/s is both the ceiling of the server side and proof that the generator has headroom.

    python bench/echo_server.py --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import uuid
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from agentstore.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc

PAGE_SIZE = 50


def prebuilt_agent(index: int = 0) -> agent_pb2.Agent:
    """An Agent shaped like the ones the benchmark seeds (same fields, similar sizes)."""
    now = timestamp_pb2.Timestamp(seconds=1_767_225_600, nanos=123_456_000)
    agent = agent_pb2.Agent(
        id=str(uuid.UUID(int=index + 1)),
        name=f"agent-{index:06d}",
        role="worker",
        kind="bench",
        status=agent_pb2.AGENT_STATUS_IDLE,
        capabilities=["python", "sql"],
        last_heartbeat_time=now,
        create_time=now,
        update_time=now,
        etag='"1"',
    )
    agent.metadata.update({"region": "eu", "shard": index % 16})
    return agent


class EchoAgentService(agent_service_pb2_grpc.AgentServiceServicer):
    """Prebuilt answers; the RPCs not overridden answer UNIMPLEMENTED (the generated base class)."""

    def __init__(self) -> None:
        self._agent = prebuilt_agent()
        self._page = agent_service_pb2.ListAgentsResponse(
            agents=[prebuilt_agent(i) for i in range(PAGE_SIZE)], next_page_token="x" * 96
        )

    async def GetAgent(self, request: agent_service_pb2.GetAgentRequest, context: Any) -> agent_pb2.Agent:
        return self._agent

    async def ListAgents(
        self, request: agent_service_pb2.ListAgentsRequest, context: Any
    ) -> agent_service_pb2.ListAgentsResponse:
        return self._page

    async def CreateAgent(self, request: agent_service_pb2.CreateAgentRequest, context: Any) -> agent_pb2.Agent:
        return self._agent

    async def UpdateAgent(self, request: agent_service_pb2.UpdateAgentRequest, context: Any) -> agent_pb2.Agent:
        return self._agent


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(EchoAgentService(), server)  # type: ignore[abstract]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise SystemExit(f"echo_server: cannot listen on 127.0.0.1:{port}")
    await server.start()
    print(f"echo_server listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50061)
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port))


if __name__ == "__main__":
    main()
