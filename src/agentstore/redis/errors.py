"""The exceptions that mean Redis failed (unreachable, too slow, or refusing a command).

Redis paths catch these and nothing else: any other exception is a bug, logged with its
traceback and answered INTERNAL, never counted as an outage.
"""

from __future__ import annotations

from redis.exceptions import RedisError

# redis-py raises RedisError subclasses (ConnectionError, TimeoutError, ResponseError, ...);
# the hand-written socket code (the bus, the pipelined GET) may also raise the OS's own errors,
# TimeoutError included (an OSError subclass).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)
