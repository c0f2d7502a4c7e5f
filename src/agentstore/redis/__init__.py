"""Redis plumbing shared by the cache, the leaderboard and (next) the locks: the bus between
server processes, the outage circuit, the pipelined GET, and which exceptions mean "Redis"."""

from agentstore.redis.errors import REDIS_ERRORS

__all__ = ["REDIS_ERRORS"]
