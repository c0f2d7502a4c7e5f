"""Prometheus metrics, served on AGENTSTORE_METRICS_PORT when it is not 0."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from agentstore.config import Settings

RPC_TOTAL = Counter("agentstore_rpc_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "agentstore_rpc_duration_seconds",
    "RPC handling time",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DEPENDENCY_UP = Gauge("agentstore_dependency_up", "1 while a dependency answers its probe", ["dependency"])


def host_for(settings: Settings) -> str:
    """/metrics listens on the host of the gRPC listen address, unless AGENTSTORE_METRICS_HOST says."""
    host = settings.metrics_host or settings.listen_address.rpartition(":")[0]
    return host.strip("[]") or "0.0.0.0"


def serve(port: int, host: str) -> Callable[[], None]:
    """Serve /metrics on host:port in a thread; the function that stops it. OSError if it cannot
    listen (the port is taken)."""
    server, thread = start_http_server(port, addr=host)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


CACHE_HITS = Counter("agentstore_cache_hits_total", "Cache hits, by entity kind and tier", ["kind", "tier"])
CACHE_MISSES = Counter("agentstore_cache_misses_total", "Cache misses, by entity kind and tier", ["kind", "tier"])
CACHE_STALE_SETS_REJECTED = Counter(
    "agentstore_cache_stale_sets_rejected_total",
    "Cache fills refused because a newer version was already known",
    ["kind", "tier"],
)
CACHE_INVALIDATIONS_SENT = Counter("agentstore_cache_invalidations_sent_total", "Invalidations published")
CACHE_INVALIDATIONS_RECEIVED = Counter("agentstore_cache_invalidations_received_total", "Invalidations received")
REDIS_OUTAGES = Counter("agentstore_redis_outages_total", "Redis outages seen (circuit opened)")
DB_STATEMENTS = Counter(
    "agentstore_db_statements_total",
    "Statements sent to PostgreSQL (transaction control included), by RPC; background jobs count as ''",
    ["method"],
)
DB_LOADS = Counter("agentstore_db_loads_total", "Entity reads that went to PostgreSQL, by entity kind", ["kind"])
CACHE_ACK_TIMEOUTS = Counter(
    "agentstore_cache_ack_timeouts_total", "Writes that returned before every process acknowledged the invalidation"
)
JOB_FAILURES = Counter("agentstore_job_failures_total", "Failed rounds of a background job, by job", ["job"])
CACHE_UNCONFIRMED_WRITES = Counter(
    "agentstore_cache_unconfirmed_writes_total",
    "Writes whose invalidation Redis did not confirm: a cache repair was recorded and the writer outlasted the"
    " cache lease before answering",
    ["kind"],
)
