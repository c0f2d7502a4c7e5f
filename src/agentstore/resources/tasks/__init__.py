"""Tasks: the CRUD servicer (service.py), the lease queue (queue.py), their SQL (sql.py) and the
task as data (model.py)."""

from __future__ import annotations

from agentstore.cache.entity import EntityCache
from agentstore.deps import Add, Deps, Resource
from agentstore.resources.agents import agent_cache
from agentstore.resources.leaderboard import leaderboard
from agentstore.resources.spec import entity_cache
from agentstore.resources.tasks.model import TASK
from agentstore.resources.tasks.queue import TaskQueue
from agentstore.resources.tasks.service import TaskService
from agentstore.v1 import task_service_pb2, task_service_pb2_grpc


def task_cache(deps: Deps) -> EntityCache:
    return entity_cache(deps, TASK)


def task_queue(deps: Deps) -> TaskQueue:
    return TaskQueue(deps.db, deps.shared(task_cache), deps.shared(agent_cache), deps.bus, deps.shared(leaderboard))


def register(add: Add, deps: Deps) -> None:
    queue = deps.shared(task_queue)
    add(
        task_service_pb2_grpc.add_TaskServiceServicer_to_server,
        TaskService(deps.db, deps.pages, deps.shared(task_cache), deps.shared(agent_cache), queue),
    )
    deps.add_job("expired task leases swept", deps.settings.lease_sweep_interval_seconds, queue.sweep)


RESOURCE = Resource.of(task_service_pb2, "TaskService", register, large_requests=("BatchCreateTasks",))

__all__ = ["RESOURCE", "TaskQueue", "TaskService", "task_cache", "task_queue"]
