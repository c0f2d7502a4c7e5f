"""What every RPC goes through: request id, deadline, auth, role check, error → status, metrics and
the access log, for unary and server-streaming RPCs alike.

It wraps each method handler once, when the service is registered, rather than through grpc.aio's
per-call ServerInterceptor hook, which costs a large share of an L1 hit. Health and reflection
are registered unwrapped (they need no key), but with the same tolerant request parsing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from agentstore import metrics
from agentstore.auth import Authenticator, check_role, required_role
from agentstore.context import Principal, RequestContext, set_current_request
from agentstore.errors import ApiError, internal, invalid_argument
from agentstore.logs import AccessLog

log = logging.getLogger(__name__)

_MAX_REQUEST_ID = 128
# Read once: an Enum member lookup through the class costs ~0.1 µs each time.
_OK = grpc.StatusCode.OK

# Generated request ids: a random per-process prefix and a counter (unique, and no syscall per RPC).
_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)

UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], Any]  # an async iterator, or a coroutine
AddToServer = Callable[[Any, Any], None]


class _Unparsed:
    """Stands in for a request that was not parsed: its bytes did not parse (the RPC answers
    INVALID_ARGUMENT MALFORMED_REQUEST), or there were too many of them (RESOURCE_EXHAUSTED)."""


MALFORMED = _Unparsed()
TOO_LARGE = _Unparsed()


def _tolerant(deserializer: Callable[[bytes], Any] | None, limit: int | None = None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        # Refused before parsing: parsing is work on the event loop that every other RPC waits for.
        if limit is not None and len(data) > limit:
            return TOO_LARGE
        try:
            return deserializer(data)
        except Exception:
            return MALFORMED

    return parse


def _refused(request: Any, limit: int | None) -> ApiError | None:
    """The error of a request that was not parsed, else None."""
    if request is MALFORMED:
        return invalid_argument("MALFORMED_REQUEST", "the request message could not be parsed")
    if request is TOO_LARGE:
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
            f"the request is larger than this RPC accepts ({limit} bytes)",
        )
    return None


def _bytes_or(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """Servicers may answer with wire bytes (a cache hit, a write's one encoding): those go out untouched."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if type(response) is bytes else serializer(response)

    return serialize


def request_id(metadata: dict[str, str]) -> str:
    given = metadata.get("x-request-id", "")
    if given and len(given) <= _MAX_REQUEST_ID and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError, rid: str) -> None:
    status = exc.to_status()
    await context.abort(
        status.code, status.details, trailing_metadata=(*status.trailing_metadata, ("x-request-id", rid))
    )


def _log_access(
    access: AccessLog, method: str, code: grpc.StatusCode, reason: str, elapsed: float, ctx: RequestContext, peer: str
) -> None:
    principal: Principal | None = ctx.principal
    access.line(
        method,
        code.name,
        reason,
        round(elapsed * 1000, 3),
        ctx.request_id,
        str(principal.tenant_id) if principal and not principal.platform_admin else None,
        str(principal.key_id) if principal and principal.key_id else None,
        peer,
    )


class ApiInterceptor:
    def __init__(
        self,
        authenticator: Authenticator,
        *,
        access_log: AccessLog | None,
        platform_services: frozenset[str],
        max_request_bytes: int,
        large_requests: frozenset[str] = frozenset(),
    ) -> None:
        self._auth = authenticator
        self._access_log = access_log
        # Each RPC parses at most max_request_bytes; those named in `large_requests` (batches) up
        # to the server's receive limit. Bytes over it are never parsed.
        self._max_request_bytes = max_request_bytes
        self._large_requests = large_requests
        # Services authenticated with the platform admin token instead of an API key.
        self._platform = platform_services

    def register(self, server: grpc.aio.Server, add_to_server: AddToServer, servicer: Any) -> None:
        """`add_XServiceServicer_to_server(servicer, server)`, with every handler wrapped."""
        capture = _Registration()
        add_to_server(servicer, capture)
        service, handlers = capture.service, capture.handlers
        wrapped = {name: self._wrap_handler(f"/{service}/{name}", service, h) for name, h in handlers.items()}
        # Generic handlers only. grpc.aio keeps one pending request-call task per *registered*
        # method and waits on all of them (asyncio.wait) for every incoming RPC: with the ~36
        # methods of all services that cost more per call (callgrind: 635k → 457k instructions
        # per L1-hit GetAgent without it) than the generic lookup it saves.
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))

    def _wrap_handler(self, method: str, service: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        platform = service in self._platform
        limit = None if method.rpartition("/")[2] in self._large_requests else self._max_request_bytes
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, platform, handler.unary_unary, limit),
                request_deserializer=_tolerant(handler.request_deserializer, limit),
                response_serializer=_bytes_or(handler.response_serializer),
            )
        if handler.unary_stream is not None:
            # The same wrapper, around a coroutine that writes the stream's messages: auth before
            # the first one; an error at any point ends the stream with its status; the metrics
            # and the access log when it ends.
            stream = handler.unary_stream

            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> None:
                await _stream_to(context, stream(request, context))

            return grpc.unary_stream_rpc_method_handler(
                self._wrap(method, platform, streamed, limit),
                request_deserializer=_tolerant(handler.request_deserializer, limit),
                response_serializer=_bytes_or(handler.response_serializer),
            )
        raise TypeError(f"{method}: client-streaming RPCs are not supported")

    def _wrap(self, method: str, platform: bool, behavior: UnaryBehavior, limit: int | None) -> UnaryBehavior:
        rpc_name = method.rpartition("/")[2]
        auth = self._auth
        access = self._access_log
        needed = required_role(rpc_name)
        timing = metrics.RPC_SECONDS.labels(method)
        succeeded = metrics.RPC_TOTAL.labels(method, _OK.name)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            remaining = context.time_remaining()
            ctx = RequestContext(
                request_id=request_id(md),
                deadline=time.monotonic() + remaining if remaining is not None else None,
                no_cache="no-cache" in md.get("cache-control", "").lower(),
                method=rpc_name,
            )
            set_current_request(ctx)
            code = _OK
            reason = ""
            try:
                if type(request) is _Unparsed:
                    raise _refused(request, limit)  # type: ignore[misc]
                if platform:
                    ctx.principal = auth.authenticate_platform(md.get("authorization"))
                else:
                    # A cached key (nearly every RPC) costs no coroutine.
                    authorization = md.get("authorization")
                    ctx.principal = auth.cached(authorization) or await auth.authenticate(authorization)
                    check_role(ctx.principal, rpc_name, needed)
                response = await behavior(request, context)
                context.set_trailing_metadata((("x-request-id", ctx.request_id),))
                return response
            except ApiError as exc:
                code, reason = exc.code, exc.reason
                await _abort(context, exc, ctx.request_id)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("unhandled error", extra={"method": method, "request_id": ctx.request_id})
                failure = internal()
                code, reason = failure.code, failure.reason
                await _abort(context, failure, ctx.request_id)
            finally:
                elapsed = time.perf_counter() - start
                timing.observe(elapsed)
                (succeeded if code is _OK else metrics.RPC_TOTAL.labels(method, code.name)).inc()
                if access is not None:
                    _log_access(access, method, code, reason, elapsed, ctx, context.peer())

        return handle


class _Registration:
    """Stands in for the server while a generated add_*_to_server registers its handlers."""

    service: str
    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


async def _stream_to(context: grpc.aio.ServicerContext, responses: Any) -> None:
    """Run a server-streaming behavior either way grpc.aio allows: an async iterator of responses
    (written here) or a coroutine that writes them itself (grpc_health's Watch does)."""
    if hasattr(responses, "__aiter__"):
        async for response in responses:
            await context.write(response)
    else:
        await responses


def register_unwrapped(server: grpc.aio.Server, add_to_server: AddToServer, servicer: Any, limit: int) -> None:
    """Register a service without auth (health, reflection): generic handlers only (see
    ApiInterceptor.register), with requests that do not parse answered INVALID_ARGUMENT."""
    capture = _Registration()
    add_to_server(servicer, capture)
    handlers = {name: _tolerate_malformed(h, limit) for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))


def _tolerate_malformed(handler: grpc.RpcMethodHandler, limit: int) -> grpc.RpcMethodHandler:
    message = "the request message could not be parsed, or is too large"
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if type(request) is _Unparsed:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, _tolerant(handler.request_deserializer, limit), handler.response_serializer
        )
    if handler.unary_stream is not None:
        stream_behavior = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            if type(request) is _Unparsed:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            await _stream_to(context, stream_behavior(request, context))

        return grpc.unary_stream_rpc_method_handler(
            stream, _tolerant(handler.request_deserializer, limit), handler.response_serializer
        )
    if handler.stream_stream is not None:  # reflection's ServerReflectionInfo
        bidi = handler.stream_stream

        async def bidi_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async def parsed() -> AsyncIterator[Any]:
                async for request in requests:
                    if type(request) is _Unparsed:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    yield request

            async for response in bidi(parsed(), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            bidi_stream, _tolerant(handler.request_deserializer, limit), handler.response_serializer
        )
    return handler
