"""The scenario catalogue: names, what each measures, and which RPCs it needs."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    # (service, method) pairs of agentstore.v1 the scenario calls.
    needs: tuple[tuple[str, str], ...] = ()
    default: bool = True


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("get_l1", "GetAgent of one agent, served from the in-process L1 cache"),
        Scenario("get_l2", "GetAgent of one agent, L1 off, served from the Redis L2 cache"),
        Scenario("get_uncached", "GetAgent of one agent, both caches off: PostgreSQL every time"),
        Scenario(
            "same_rate",
            "GetAgent from L1 and echo at the same offered rates (h2load --rps): what agentstore adds to p50/p90/p99",
        ),
        Scenario("list_filtered", 'ListAgents, page of 50, filter status = IDLE AND capabilities:"python"'),
        Scenario("create", "CreateAgent with a unique name and request_id per call (audit row included)"),
        Scenario("update_etag", "GetAgent then UpdateAgent with its etag; every slot owns its agents"),
        Scenario(
            "claim_complete",
            "ClaimTask then CompleteTask with its lease token, 8 agents, one cycle in flight each",
            (("TaskService", "ClaimTask"), ("TaskService", "CompleteTask")),
        ),
        Scenario(
            "batch_create_tasks",
            "BatchCreateTasks of 1,000 small tasks per call (rows/s too)",
            (("TaskService", "BatchCreateTasks"),),
        ),
        Scenario(
            "queue_peers",
            "Graphile Worker and Procrastinate on the same PostgreSQL: claim -> complete jobs/s (8 workers) and "
            "bulk insert rows/s (1,000 per call), agentstore's ratio to each",
            (("TaskService", "ClaimTask"), ("TaskService", "CompleteTask"), ("TaskService", "BatchCreateTasks")),
        ),
        Scenario("mixed", "90% GetAgent / 10% UpdateAgent over 100,000 agents, keys Zipf(1.1); also vs naive"),
        Scenario("watch_fanout", "WatchEvents to 50 watchers", (("EventService", "WatchEvents"),)),
        Scenario(
            "memory",
            "RSS after 100,000 and after 1,000,000 GetAgent requests, and their ratio (long)",
            default=False,
        ),
    )
}

DEFAULT_SCENARIOS = [s.name for s in SCENARIOS.values() if s.default]

# Scenarios whose RPCs exist but for which this harness has no workload yet.
IMPLEMENTED = {
    "get_l1",
    "get_l2",
    "get_uncached",
    "same_rate",
    "list_filtered",
    "create",
    "update_etag",
    "claim_complete",
    "batch_create_tasks",
    "queue_peers",
    "mixed",
    "memory",
}


def _methods() -> dict[str, set[str]]:
    """Every service of agentstore.v1 (short name) and its methods, read from the descriptors."""
    import agentstore.v1 as package

    found: dict[str, set[str]] = {}
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.endswith("_pb2"):
            continue
        try:
            mod = importlib.import_module(f"agentstore.v1.{module.name}")
        except Exception:
            continue
        for service in mod.DESCRIPTOR.services_by_name.values():
            found.setdefault(service.name, set()).update(m.name for m in service.methods)
    return found


def skip_reason(scenario: Scenario) -> str | None:
    """Why the scenario cannot run against this build, or None when it can."""
    methods = _methods()
    missing = [
        f"agentstore.v1.{service}/{method}"
        for service, method in scenario.needs
        if method not in methods.get(service, ())
    ]
    if missing:
        return f"{' and '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist yet"
    if scenario.name not in IMPLEMENTED:
        return "the RPCs exist but the harness has no workload for this scenario yet"
    return None
