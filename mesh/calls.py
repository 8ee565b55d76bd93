"""One attempt of an outgoing unary call, client side, however it travels (a gRPC call
through :mod:`mesh.client`'s interceptor, or a message of a pipe, :mod:`mesh.pipe`):

* its timeout: the smaller of the caller's cap and the request's remaining budget minus
  :data:`CALL_MARGIN_S`, so no hop waits past the request's deadline; nothing left fails
  fast with :class:`~mesh.errors.DeadlineExceeded`;
* the W3C trace context of a CLIENT span for the attempt, to send with the call's
  metadata (beside :func:`mesh.context.outgoing_metadata`), so the server's span is its
  child;
* the span's status and the client latency metric once the attempt ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from mesh import tracing
from mesh.context import Budget, budget_var
from mesh.metrics import RPC_CLIENT_SECONDS

CALL_MARGIN_S = 0.002
"""Time kept back from every downstream call so the caller can still answer."""

NO_BUDGET_TIMEOUT_S = 1.0
"""Timeout of a call made outside any request (tooling, background jobs)."""


def call_timeout(cap_s: float | None) -> float:
    """The timeout of an attempt capped at ``cap_s`` within the current request's budget.

    Raises:
        DeadlineExceeded: the request's budget is spent.
    """
    budget: Budget | None = budget_var.get()
    if budget is not None:
        return budget.for_call(cap_s, CALL_MARGIN_S)
    return cap_s if cap_s is not None else NO_BUDGET_TIMEOUT_S


class Attempt:
    """The attempt in flight: set ``code`` and ``details`` before it ends with a failure."""

    def __init__(self, carrier: dict[str, str]) -> None:
        self.carrier = carrier
        """The span's trace context, to send as metadata."""
        self.code = grpc.StatusCode.OK
        self.details = ""


@contextmanager
def attempt(method: str, target: str, timeout_s: float) -> Iterator[Attempt]:
    """A CLIENT span around one attempt of ``method`` at ``target``; on exit the span gets
    the attempt's status and ends, and ``rpc_client_seconds`` observes it. A failure that
    leaves the block as :class:`grpc.aio.AioRpcError` or cancellation sets the status
    itself."""
    span = tracing.client_span(method, target)
    tracing.annotate(span, timeout_ms=round(timeout_s * 1000, 3))
    carrier: dict[str, str] = {}
    tracing.inject(carrier, span)
    current = Attempt(carrier)
    started = time.perf_counter()
    try:
        yield current
    except grpc.aio.AioRpcError as exc:
        current.code, current.details = exc.code(), exc.details() or ""
        raise
    except asyncio.CancelledError:
        current.code = grpc.StatusCode.CANCELLED
        raise
    finally:
        tracing.end_rpc(span, current.code, server=False, details=current.details)
        span.end()
        service, _, name = method.lstrip("/").rpartition("/")
        RPC_CLIENT_SECONDS.labels(service, name, current.code.name).observe(
            time.perf_counter() - started
        )
