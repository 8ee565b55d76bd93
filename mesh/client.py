"""The client factory: channels whose every call carries context and a clamped deadline.

``open_channel(target)`` returns a ``grpc.aio`` channel with keepalive settings that
match the servers', and a client interceptor that, for every unary call:

* adds the current tenant and request id to the metadata;
* sets the call timeout to the smaller of the caller's cap (``timeout=`` at the call
  site, the stage budget) and the request's remaining budget minus a safety margin,
  so no hop ever waits past the request's deadline;
* fails fast with :class:`~mesh.errors.DeadlineExceeded` when nothing is left.

Create channels inside the running event loop (one loop per process).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc

from mesh.context import Budget, budget_var, outgoing_metadata

CALL_MARGIN_S = 0.002
"""Time kept back from every downstream call so the caller can still answer."""

NO_BUDGET_TIMEOUT_S = 1.0
"""Timeout of a call made outside any request (tooling, background jobs)."""


class _ContextInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        budget: Budget | None = budget_var.get()
        cap = client_call_details.timeout
        if budget is not None:
            timeout = budget.for_call(cap, CALL_MARGIN_S)
        else:
            timeout = cap if cap is not None else NO_BUDGET_TIMEOUT_S
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
        for key, value in outgoing_metadata():
            if not metadata.get_all(key):
                metadata.add(key, value)
        details = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]
"""Keepalive at 30 s (servers allow pings every 5 s, so no GOAWAY); retries are not
done by the channel: the retry policy lives in one layer of :mod:`mesh`."""


def describe_failure(exc: Exception) -> str:
    """One line for a failed downstream call: status code and details, or the error text."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure channel to ``target`` (``host:port``) with the mesh interceptor."""
    return grpc.aio.insecure_channel(
        target, options=CHANNEL_OPTIONS, interceptors=[_ContextInterceptor()]
    )


async def connect_eagerly(channels: list[grpc.aio.Channel], timeout_s: float = 2.0) -> None:
    """Open the connections of ``channels`` now, so the first request does not pay for it.

    A downstream that is not up yet is not an error: its channel connects on first use.
    """

    async def ready(channel: grpc.aio.Channel) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.channel_ready(), timeout_s)

    await asyncio.gather(*(ready(c) for c in channels))
