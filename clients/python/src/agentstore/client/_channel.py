"""Channels to agentstore that add the API key, a request id and the published service config.

Both factories install one interceptor that, on every call, adds `authorization: Bearer <key>`
(unless the call brings its own) and `x-request-id` (a new UUID unless the call brings one; the
server echoes it in the trailers and logs it). The channel carries the service config in
`service_config.json`: calls failing with UNAVAILABLE are retried with exponential backoff, and
all retries of a call share its request id.
"""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Sequence
from importlib import resources
from typing import Any

import grpc
import grpc.aio

AUTHORIZATION = "authorization"
REQUEST_ID = "x-request-id"

# The published service config (retry on UNAVAILABLE with backoff), as the JSON text gRPC wants.
SERVICE_CONFIG: str = resources.files("agentstore.client").joinpath("service_config.json").read_text(encoding="utf-8")

ChannelOption = tuple[str, Any]


def channel_options(extra: Sequence[ChannelOption] = ()) -> list[ChannelOption]:
    """The channel arguments both factories use: the service config, retries on, then `extra`."""
    # Round-trip through json: a config that does not parse fails here, not deep inside gRPC.
    config = json.dumps(json.loads(SERVICE_CONFIG))
    return [("grpc.service_config", config), ("grpc.enable_retries", 1), *extra]


def _outgoing_metadata(metadata: Any, api_key: str | None) -> list[tuple[str, str | bytes]]:
    pairs: list[tuple[str, str | bytes]] = [(str(k), v) for k, v in (metadata or ())]
    keys = {k.lower() for k, _ in pairs}
    if api_key is not None and AUTHORIZATION not in keys:
        pairs.append((AUTHORIZATION, f"Bearer {api_key}"))
    if REQUEST_ID not in keys:
        pairs.append((REQUEST_ID, str(uuid.uuid4())))
    return pairs


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """grpc.ClientCallDetails is abstract; interceptors that change metadata build their own."""


class _SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key

    def _details(self, details: Any) -> Any:
        return _SyncCallDetails(
            details.method,
            details.timeout,
            _outgoing_metadata(details.metadata, self._api_key),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class _AsyncInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*_outgoing_metadata(details.metadata, self._api_key))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def connect(
    target: str,
    api_key: str | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[ChannelOption] = (),
) -> grpc.Channel:
    """A blocking channel to `target` ("host:port"); TLS when `credentials` are given, else plaintext."""
    args = channel_options(options)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=args)
    else:
        channel = grpc.secure_channel(target, credentials, options=args)
    return grpc.intercept_channel(channel, _SyncInterceptor(api_key))


def aio_connect(
    target: str,
    api_key: str | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[ChannelOption] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`; TLS when `credentials` are given, else plaintext."""
    args = channel_options(options)
    interceptors = [_AsyncInterceptor(api_key)]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=args, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=args, interceptors=interceptors)
