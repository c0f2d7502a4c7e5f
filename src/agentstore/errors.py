"""Domain errors and their one mapping to a gRPC status with google.rpc details.

Every failure a client can see is an `ApiError`: a status code, a machine-readable reason
(google.rpc.ErrorInfo, domain "agentstore") and, where a request field was at fault,
google.rpc.BadRequest field violations. Nothing else crosses the wire: unexpected exceptions
become INTERNAL without their text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "agentstore"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class ApiError(Exception):
    code: grpc.StatusCode
    reason: str
    message: str
    violations: tuple[FieldViolation, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        details = [_pack(info)]
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad_request))
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(proto)


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(reason: str, message: str, violations: Iterable[tuple[str, str]] | None = None) -> ApiError:
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        message,
        tuple(FieldViolation(f, d) for f, d in (violations or ())),
    )


def invalid_field(field_path: str, description: str) -> ApiError:
    return invalid_argument("INVALID_FIELD", f"{field_path}: {description}", [(field_path, description)])


def not_found(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, reason, message)


def etag_mismatch(entity: str) -> ApiError:
    return ApiError(
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
        f"the {entity} changed since it was read; read it again and retry with the new etag",
    )


def unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def permission_denied(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, reason, message)


def internal() -> ApiError:
    return ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; see the server log for this request id")


class StartupError(Exception):
    """The server must not start; the message is one line for the operator. The exit code: 2 for
    configuration (a bad URL, credentials, a port in use), 1 for a dependency that cannot be reached."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
