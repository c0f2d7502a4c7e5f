"""agentstore from Python, with the agentstore-client package (docs/clients/python.md).

    pip install "./clients/python[health]"
    AGENTSTORE_API_KEY=$(cat .agentstore/demo-api-key) python docs/clients/python/quickstart.py

Creates agents, gets one, lists them with a filter in pages, updates one with its etag and a field
mask, claims and completes a task, decodes a typed error, checks health, and prints what it saw as
one JSON object. Names carry a random suffix, so it can run again against the same tenant.
"""

from __future__ import annotations

import json
import os
import uuid

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from agentstore.client import check_health, connect, error_details, iter_items, iter_pages
from agentstore.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)


def main() -> None:
    address = os.environ.get("AGENTSTORE_ADDRESS", "127.0.0.1:50051")
    run = uuid.uuid4().hex[:8]
    skill = f"python-{run}"
    seen: dict[str, object] = {}

    # The channel adds `authorization: Bearer <key>` and an x-request-id to every call, and
    # retries UNAVAILABLE with backoff (agentstore.client's published service config).
    with connect(address, os.environ["AGENTSTORE_API_KEY"]) as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)

        # Create: request_id makes a retried create return the first result instead of a duplicate.
        planner = agent_pb2.Agent(name=f"planner-{run}", role="planner", capabilities=[skill])
        planner.metadata.update({"region": "eu"})  # a google.protobuf.Struct
        created = agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=planner, request_id=str(uuid.uuid4())))
        for i in range(2):
            worker = agent_pb2.Agent(name=f"worker-{run}-{i}", capabilities=[skill])
            worker.metadata.update({"region": "eu"})
            agents.CreateAgent(agent_service_pb2.CreateAgentRequest(agent=worker))
        seen["created"] = created.name

        # Get
        got = agents.GetAgent(agent_service_pb2.GetAgentRequest(id=created.id))
        seen["got_same_etag"] = got.etag == created.etag

        # List with a filter (AIP-160), two per page; iter_items follows next_page_token.
        query = agent_service_pb2.ListAgentsRequest(
            filter=f'capabilities:"{skill}" AND metadata.region = "eu"', order_by="name", page_size=2
        )
        seen["listed"] = [a.name for a in iter_items(agents.ListAgents, query, lambda page: page.agents)]
        seen["pages"] = sum(1 for _ in iter_pages(agents.ListAgents, query))

        # Update one field by mask, guarded by the etag; the same stale etag again is a typed error.
        patch = agent_service_pb2.UpdateAgentRequest(
            agent=agent_pb2.Agent(id=got.id, role="lead", etag=got.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        )
        seen["updated_role"] = agents.UpdateAgent(patch).role
        try:
            agents.UpdateAgent(patch)
        except grpc.RpcError as exc:
            stale = error_details(exc)
            seen["stale_update"] = {"code": stale.code.name, "reason": stale.reason}

        # Claim a task for the planner (a lease of 60 s) and complete it with its lease token.
        tasks.CreateTask(
            task_service_pb2.CreateTaskRequest(
                task=task_pb2.Task(title="index the docs", priority=5, required_capabilities=[skill])
            )
        )
        claimed = tasks.ClaimTask(
            task_service_pb2.ClaimTaskRequest(agent_id=created.id, lease_duration=duration_pb2.Duration(seconds=60))
        )
        seen["claimed_lease_token"] = str(claimed.lease_token)
        done_request = task_service_pb2.CompleteTaskRequest(task_id=claimed.task.id, lease_token=claimed.lease_token)
        done_request.result.update({"pages": 12})
        done = tasks.CompleteTask(done_request)
        seen["completed_status"] = task_pb2.TaskStatus.Name(done.status)

        # A typed error: ErrorInfo.reason to switch on, BadRequest naming the field.
        try:
            agents.GetAgent(agent_service_pb2.GetAgentRequest(id="not-a-uuid"))
        except grpc.RpcError as exc:
            error = error_details(exc)
            seen["error"] = {"code": error.code.name, "reason": error.reason, "fields": list(error.fields)}

        # Health (grpc.health.v1, no key needed; "" is the whole server).
        seen["health"] = check_health(channel)

    print(json.dumps(seen))


if __name__ == "__main__":
    main()
