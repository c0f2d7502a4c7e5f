"""grpc.health.v1 Check through any channel, typed. Needs the `health` extra (grpcio-health-checking):
    pip install "agentstore-client[health]"

grpcio-health-checking's HealthStub has no typed methods (types-grpcio-health-checking declares
none), so these call the method by name with the extra's message classes.
"""

from __future__ import annotations

import grpc
import grpc.aio

CHECK = "/grpc.health.v1.Health/Check"


def check_health(channel: grpc.Channel, service: str = "", *, timeout: float | None = None) -> str:
    """The serving status of `service` ("" is the whole server) by name: "SERVING", "NOT_SERVING", ..."""
    from grpc_health.v1 import health_pb2

    check = channel.unary_unary(
        CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


# `timeout` is the call's gRPC deadline, not an asyncio timeout (hence noqa ASYNC109).
async def acheck_health(
    channel: grpc.aio.Channel,
    service: str = "",
    *,
    timeout: float | None = None,  # noqa: ASYNC109
) -> str:
    """The asyncio form of check_health."""
    from grpc_health.v1 import health_pb2

    check = channel.unary_unary(
        CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
