"""Per-request context carried across hops: tenant, request id and the call's budget.

The server interceptor fills these context variables from incoming metadata; the
client interceptor copies them into outgoing metadata; logging reads them. Handlers
never pass them around by hand.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable

from mesh.errors import DeadlineExceeded, InvalidArgument

TENANT_KEY = "x-recmesh-tenant"
REQUEST_ID_KEY = "x-request-id"
API_KEY = "x-api-key"

MAX_TENANT_LEN = 64

tenant_var: contextvars.ContextVar[str] = contextvars.ContextVar("recmesh_tenant", default="")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "recmesh_request_id", default=""
)


class Budget:
    """The time a request has left, on a monotonic clock.

    Args:
        seconds: time available from now.
        clock: injectable monotonic clock (tests).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expires = clock() + seconds

    def remaining(self) -> float:
        """Seconds left; negative once expired."""
        return self._expires - self._clock()

    def for_call(self, cap_s: float | None = None, margin_s: float = 0.002) -> float:
        """The timeout to give a downstream call: remaining minus ``margin_s``, at most ``cap_s``.

        Raises:
            DeadlineExceeded: nothing useful is left for the call.
        """
        left = self.remaining() - margin_s
        if cap_s is not None:
            left = min(left, cap_s)
        if left <= 0.0005:
            raise DeadlineExceeded("request budget exhausted before the call")
        return left


budget_var: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "recmesh_budget", default=None
)


def clamp_deadline(time_remaining: float | None, default_s: float, max_s: float) -> float:
    """The budget for a call given what the caller sent.

    gRPC Python reports a huge ``time_remaining`` when the caller set no deadline
    (grpc issue 26236), and ``None`` outside a call: both get ``default_s``; anything
    else is capped at ``max_s``.
    """
    if time_remaining is None or time_remaining > 10 * max_s:
        return default_s
    return max(0.0, min(time_remaining, max_s))


def validate_tenant(tenant: str, field: str = TENANT_KEY) -> str:
    """A tenant name as found in metadata, or in the request field ``field``, checked.

    Raises:
        InvalidArgument: empty, too long, or with characters outside ``[a-z0-9_-]``;
            naming ``field``.
    """
    where = f"metadata {TENANT_KEY}" if field == TENANT_KEY else field
    if not tenant:
        raise InvalidArgument(f"{where} is required", field=field)
    if len(tenant) > MAX_TENANT_LEN or not all(c.isalnum() or c in "-_" for c in tenant):
        raise InvalidArgument(f"{where} is malformed", field=field)
    return tenant


def current_tenant() -> str:
    """The tenant of the call being served.

    Raises:
        InvalidArgument: the call carried no tenant.
    """
    return validate_tenant(tenant_var.get())


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata entries that carry the current context to the next hop."""
    entries = []
    if tenant := tenant_var.get():
        entries.append((TENANT_KEY, tenant))
    if request_id := request_id_var.get():
        entries.append((REQUEST_ID_KEY, request_id))
    return tuple(entries)


def detached() -> contextvars.Context:
    """A copy of the current context for background work that serves the current tenant
    but no one request (a refresh, a shared fetch): the tenant stays (the work's calls name
    it), the request's budget and id do not (its deadline must not cap the work, nor its
    id label the work's logs)."""
    context = contextvars.copy_context()
    context.run(budget_var.set, None)
    context.run(request_id_var.set, "")
    return context
