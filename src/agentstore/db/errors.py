"""The one table that turns PostgreSQL and pool failures into API errors.

Errors are matched by asyncpg exception class (one class per SQLSTATE), never by message text.
Constraint names map to resource-specific reasons, registered by the resource that owns them.
Nothing here ever copies SQL or server text into a client-visible message.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import grpc

from agentstore.errors import ApiError, FieldViolation


@dataclass(frozen=True)
class ConstraintReason:
    code: grpc.StatusCode
    reason: str
    message: str
    field: str | None = None


_CONSTRAINTS: dict[str, ConstraintReason] = {}


def register_constraint(name: str, reason: ConstraintReason) -> None:
    """Give a named constraint its own reason, e.g. agents_name_key -> AGENT_NAME_TAKEN."""
    _CONSTRAINTS[name] = reason


# Retried by db.Database.run() with bounded backoff before they become ABORTED.
RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)

# (exception class, status, reason, message): the first matching class wins.
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str, str], ...] = (
    (asyncpg.UniqueViolationError, grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS", "the resource already exists"),
    (
        asyncpg.ForeignKeyViolationError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "REFERENCED_RESOURCE_MISSING",
        "a resource this one refers to does not exist",
    ),
    (asyncpg.CheckViolationError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "a field value is out of bounds"),
    (asyncpg.NotNullViolationError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "a required field is missing"),
    (
        asyncpg.ExclusionViolationError,
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONFLICT",
        "the change conflicts with another resource",
    ),
    (
        asyncpg.SerializationError,
        grpc.StatusCode.ABORTED,
        "CONCURRENT_MODIFICATION",
        "the transaction conflicted with a concurrent one; retry",
    ),
    (
        asyncpg.DeadlockDetectedError,
        grpc.StatusCode.ABORTED,
        "CONCURRENT_MODIFICATION",
        "the transaction conflicted with a concurrent one; retry",
    ),
    (
        asyncpg.QueryCanceledError,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        "the statement ran out of time and was cancelled",
    ),
    (
        asyncpg.InsufficientPrivilegeError,
        grpc.StatusCode.PERMISSION_DENIED,
        "DATABASE_PRIVILEGE",
        "the server's database role may not do this",
    ),
    # Class 22: data the client sent that PostgreSQL cannot store (NUL bytes, bad encodings).
    (asyncpg.DataError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE", "a value cannot be stored"),
    (
        asyncpg.TooManyConnectionsError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database refuses more connections",
    ),
    (
        asyncpg.PostgresConnectionError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database cannot be reached",
    ),
    (
        asyncpg.CannotConnectNowError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database is starting up or shutting down",
    ),
    (
        asyncpg.AdminShutdownError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database connection was terminated",
    ),
    (
        asyncpg.CrashShutdownError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database connection was terminated",
    ),
    (
        asyncpg.InternalClientError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database connection was lost",
    ),
    (asyncpg.InterfaceError, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database connection was lost"),
    (ConnectionError, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached"),
    (OSError, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached"),
)


def map_database_error(exc: BaseException) -> ApiError | None:
    """The API error for a database failure, or None when it is not one (a programming error)."""
    if isinstance(exc, asyncpg.PostgresError):
        constraint = getattr(exc, "constraint_name", None)
        if constraint and constraint in _CONSTRAINTS:
            c = _CONSTRAINTS[constraint]
            violations = (FieldViolation(c.field, c.message),) if c.field else ()
            return ApiError(c.code, c.reason, c.message, violations)
    for cls, code, reason, message in _TABLE:
        if isinstance(exc, cls):
            return ApiError(code, reason, message)
    return None


def pool_exhausted() -> ApiError:
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "POOL_EXHAUSTED",
        "no database connection became free in time; retry with backoff",
    )


def database_unavailable() -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database cannot be reached; retry")


def deadline_exceeded() -> ApiError:
    return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the call's deadline ran out")
