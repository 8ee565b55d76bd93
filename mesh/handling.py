"""What the mesh does around every unary call a service serves, however the call arrived.

A call arrives as a gRPC unary call (``mesh.server``'s interceptor) or as one message of a
pipe (:mod:`mesh.pipe`); both run it through the method's :class:`MethodHandling`, so the
tenant rule, budget, span, fault flags, error mapping and metrics are the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mesh import tracing
from mesh.context import (
    REQUEST_ID_KEY,
    TENANT_KEY,
    Budget,
    budget_var,
    clamp_deadline,
    request_id_var,
    tenant_var,
)
from mesh.errors import InvalidArgument, RecMeshError, store_unavailable
from mesh.faults import FaultInjector, InjectedFault
from mesh.identity import rule_for
from mesh.metrics import RPC_SERVER_HANDLED, RPC_SERVER_SECONDS
from mesh.settings import ServerSettings

log = logging.getLogger(__name__)


class CallFailed(Exception):
    """A call's failure as its caller sees it: a status code, details, trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = trailing


def failure_of(exc: RecMeshError) -> CallFailed:
    """The status a domain error answers with (the one error→status mapping)."""
    trailing: tuple[tuple[str, str], ...] = ()
    if exc.field is not None:
        trailing = (("x-recmesh-field", exc.field),)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        trailing = (*trailing, ("retry-after", f"{retry_after:.3f}"))
    return CallFailed(exc.grpc_code, exc.message, trailing)


def _decode(deserialize: Callable[[bytes], Any] | None, raw: bytes, method: str) -> Any:
    """The request message, decoded here so corrupt bytes map to INVALID_ARGUMENT."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError as exc:
        raise InvalidArgument(
            f"request to {method} is not a valid message: {exc}", field="request"
        ) from exc


class MethodHandling:
    """What the mesh does around every unary call of one method, however it arrived (a gRPC
    call through ``mesh.server``'s interceptor, or a message of a pipe, :mod:`mesh.pipe`):
    request context and budget from the call's metadata and deadline, the tenant rule of
    :mod:`mesh.identity` under mTLS, a SERVER span continuing the caller's trace, fault
    flags, domain errors mapped to status codes, RED metrics and the access log.
    """

    def __init__(
        self,
        method: str,
        settings: ServerSettings,
        faults: FaultInjector,
        *,
        secure: bool,
        deserialize: Callable[[bytes], Any] | None,
    ) -> None:
        self.method = method
        self._settings = settings
        self._faults = faults
        self._deserialize = deserialize
        self._short_name = method.rsplit("/", 1)[-1]
        self._grpc_service = method.lstrip("/").rsplit("/", 1)[0]
        self._seconds_metric = RPC_SERVER_SECONDS.labels(self._grpc_service, self._short_name)
        self._rule = rule_for(settings.service_name) if secure else None

    def budget_s(self, time_remaining: float | None) -> float:
        """The call's budget given the deadline its caller sent (``None``: none sent)."""
        default = self._settings.default_deadline_s
        return clamp_deadline(time_remaining, default, default)

    async def run(
        self,
        metadata: Mapping[str, Any],
        seconds: float,
        peer: Callable[[], str | None],
        raw: bytes,
        invoke: Callable[[Any], Awaitable[Any]],
    ) -> Any:
        """``invoke(request)`` for the call whose encoded request is ``raw``, with
        ``seconds`` of budget; ``peer()`` names the caller's certificate identity.

        Raises:
            CallFailed: the status the call answers with (anything but OK).
            asyncio.CancelledError: the call was cancelled.
        """
        method = self.method
        tenant = str(metadata.get(TENANT_KEY, ""))
        request_id = str(metadata.get(REQUEST_ID_KEY, "")) or uuid.uuid4().hex
        tenant_var.set(tenant)
        request_id_var.set(request_id)
        budget_var.set(Budget(seconds))
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        with tracing.server_span(
            method,
            metadata,
            tenant=tenant or None,
            request_id=request_id,
            deadline_ms=round(seconds * 1000, 3),
        ) as span:
            try:
                rule = self._rule
                if rule is not None and (tenant or rule.every_call):
                    rule.check(self._settings.service_name, peer(), tenant)
                request = _decode(self._deserialize, raw, method)
                faults = self._faults
                if (flag := faults.active(self._short_name)) is not None:
                    tracing.annotate(span, fault_flag=f"{self._settings.service_name}.{flag[0]}")
                await faults.apply(self._short_name)
                return await invoke(request)
            except RecMeshError as exc:
                code = exc.grpc_code
                if isinstance(exc, InjectedFault):
                    tracing.annotate(span, fault_injected=True)
                raise failure_of(exc) from exc
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except CallFailed as exc:
                code = exc.code
                raise
            except Exception as exc:
                span.record_exception(exc)
                if store_unavailable(exc):
                    # A store the service depends on is unreachable (a server, or a
                    # cluster's slot during a failover): transient, not a bug.
                    code = grpc.StatusCode.UNAVAILABLE
                    log.warning("redis unavailable in %s: %s", method, exc)
                    raise CallFailed(code, "redis unavailable") from exc
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in %s", method)
                raise CallFailed(code, "internal error") from exc
            finally:
                elapsed = time.perf_counter() - started
                tracing.end_rpc(span, code, server=True)
                RPC_SERVER_HANDLED.labels(self._grpc_service, self._short_name, code.name).inc()
                self._seconds_metric.observe(elapsed, tracing.exemplar(span))
                log.debug(
                    "rpc",
                    extra={
                        "fields": {
                            "method": method,
                            "code": code.name,
                            "ms": round(elapsed * 1000, 3),
                        }
                    },
                )
