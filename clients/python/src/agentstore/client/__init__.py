"""A thin typed layer over the generated stubs in agentstore.v1: channels, errors, paging.

from agentstore.client import connect, error_details, iter_items
from agentstore.v1 import agent_service_pb2, agent_service_pb2_grpc

with connect("127.0.0.1:50051", api_key) as channel:
    agents = agent_service_pb2_grpc.AgentServiceStub(channel)
    request = agent_service_pb2.ListAgentsRequest(filter='capabilities:"python"', page_size=50)
    for agent in iter_items(agents.ListAgents, request, lambda page: page.agents):
        print(agent.name)
"""

from agentstore.client._channel import (
    AUTHORIZATION,
    REQUEST_ID,
    SERVICE_CONFIG,
    aio_connect,
    channel_options,
    connect,
)
from agentstore.client._errors import DOMAIN, ErrorDetails, FieldViolation, error_details
from agentstore.client._health import acheck_health, check_health
from agentstore.client._paging import aiter_items, aiter_pages, iter_items, iter_pages

__all__ = [
    "AUTHORIZATION",
    "DOMAIN",
    "REQUEST_ID",
    "SERVICE_CONFIG",
    "ErrorDetails",
    "FieldViolation",
    "acheck_health",
    "aio_connect",
    "aiter_items",
    "aiter_pages",
    "channel_options",
    "check_health",
    "connect",
    "error_details",
    "iter_items",
    "iter_pages",
]
