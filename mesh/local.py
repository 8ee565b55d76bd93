"""In-process calls that look like gRPC calls: the transport of the monolith baseline.

:class:`LocalStub` stands where a generated ``*Stub`` stands: ``await stub.Method(request,
timeout=s)`` calls ``servicer.Method(request, None)`` in this process, with no
serialisation and no network. Everything else a call goes through in the mesh stays: the
caller's :class:`~mesh.client.Downstream` guards (bulkhead, breaker, retry budget), the
request context (tenant, request id) and a budget capped by ``timeout``. Failures come back
as the :class:`grpc.aio.AioRpcError` a remote call would have raised, with the status code
the error class carries (:mod:`mesh.errors`) and the same Redis-down mapping as
:mod:`mesh.server`, so the caller's fallbacks behave the same.

It exists to measure what the RPC hops cost (``python -m loadtest.monolith``); the
mesh itself never uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from mesh.calls import call_timeout
from mesh.context import Budget, budget_var
from mesh.errors import RecMeshError, store_unavailable

LocalMethod = Callable[..., Awaitable[Any]]


def _status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def _invoke(method: LocalMethod, request: Any, cap_s: float | None) -> Any:
    """Run one handler as the server interceptor would, under the budget a call would get."""
    seconds = call_timeout(cap_s)  # DeadlineExceeded, as a channel
    token = budget_var.set(Budget(seconds))
    try:
        async with asyncio.timeout(seconds):
            return await method(request, None)
    except RecMeshError as exc:
        raise _status(exc.grpc_code, exc.message) from exc
    except TimeoutError as exc:
        raise _status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from exc
    except Exception as exc:
        if store_unavailable(exc):
            raise _status(grpc.StatusCode.UNAVAILABLE, "redis unavailable") from exc
        raise
    finally:
        budget_var.reset(token)


class LocalStub:
    """A stub whose methods call ``servicer`` in-process (see the module docstring).

    ``stub.Method(request, timeout=None)`` returns an awaitable of the servicer's reply.
    The handler runs in the caller's task under its own budget, which is reset afterwards.
    """

    def __init__(self, servicer: Any) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method: LocalMethod = getattr(self._servicer, name)

        def call(request: Any, timeout: float | None = None) -> Awaitable[Any]:
            return _invoke(method, request, timeout)

        return call


def local_stub(servicer: object) -> Any:
    """A :class:`LocalStub` over ``servicer``, typed as whichever generated stub it stands for."""
    return LocalStub(servicer)
