"""The rich error model (google.rpc.Status in `grpc-status-details-bin`) decoded into typed values.

agentstore answers every error with a google.rpc.ErrorInfo (domain "agentstore", a `reason` a
program can switch on), adds a google.rpc.BadRequest when request fields were at fault, and may
add a google.rpc.RetryInfo saying when to try again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from agentstore.client._channel import REQUEST_ID

STATUS_DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "agentstore"


@dataclass(frozen=True)
class FieldViolation:
    """One request field at fault: its path (e.g. "agent.name") and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorDetails:
    """What a failed call said, decoded. `reason` is None only for errors not made by agentstore
    (e.g. UNAVAILABLE from the channel itself, or DEADLINE_EXCEEDED measured by the client)."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: tuple[FieldViolation, ...] = ()
    retry_delay: timedelta | None = None
    request_id: str | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(v.field for v in self.field_violations)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _call_parts(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[tuple[str, Any]]]:
    # Sync errors are grpc.Call objects too; grpc.aio raises AioRpcError. Both offer the same three.
    if isinstance(error, grpc.aio.AioRpcError | grpc.Call):
        trailers = [(str(k), v) for k, v in (error.trailing_metadata() or ())]
        return error.code(), error.details() or "", trailers
    raise TypeError(f"{type(error).__name__} carries no status: only errors raised by a call do")


def _status(trailers: Iterable[tuple[str, Any]]) -> status_pb2.Status | None:
    for key, value in trailers:
        if key == STATUS_DETAILS_KEY:
            raw = value if isinstance(value, bytes) else str(value).encode("latin-1")
            return status_pb2.Status.FromString(raw)
    return None


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Decode the status, ErrorInfo, BadRequest and RetryInfo of a failed call (sync or asyncio)."""
    code, message, trailers = _call_parts(error)
    request_id = next((_text(v) for k, v in trailers if k == REQUEST_ID), None)
    status = _status(trailers)
    if status is None:
        return ErrorDetails(code, message, request_id=request_id)
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[FieldViolation] = []
    retry_delay: timedelta | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry_delay = retry_info.retry_delay.ToTimedelta()
    return ErrorDetails(
        code=code,
        message=status.message or message,
        reason=info.reason if info is not None else None,
        domain=info.domain if info is not None else None,
        metadata=dict(info.metadata) if info is not None else {},
        field_violations=tuple(violations),
        retry_delay=retry_delay,
        request_id=request_id,
    )
