"""The client factory: channels whose every call carries context and a clamped deadline.

``open_channel(target, transport)`` returns a ``grpc.aio`` channel (mTLS with the process's
certificate, or plaintext: :class:`mesh.tls.Transport`) with keepalive settings that
match the servers', and a client interceptor that, for every unary call:

* adds the current tenant and request id to the metadata;
* sets the call timeout to the smaller of the caller's cap (``timeout=`` at the call
  site, the stage budget) and the request's remaining budget minus a safety margin,
  so no hop ever waits past the request's deadline;
* fails fast with :class:`~mesh.errors.DeadlineExceeded` when nothing is left;
* opens a CLIENT span for the attempt and injects its W3C trace context into the
  metadata, so the server's span is its child (``mesh.tracing``).

Create channels inside the running event loop (one loop per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from mesh import tracing
from mesh.calls import CALL_MARGIN_S, attempt, call_timeout
from mesh.context import budget_var, outgoing_metadata
from mesh.errors import DeadlineExceeded
from mesh.metrics import (
    BREAKER_STATE,
    DOWNSTREAM_CALLS,
    DOWNSTREAM_REJECTED,
    DOWNSTREAM_RETRIES,
    BreakerMetrics,
)
from mesh.pipe import PipeStub, service_of
from mesh.resilience import (
    AsyncBreaker,
    Bulkhead,
    BulkheadFull,
    CircuitOpen,
    RetryBudget,
    backoff_s,
    is_retryable,
)
from mesh.tls import PLAINTEXT, Transport

StubT = TypeVar("StubT")
R = TypeVar("R")


class _ContextInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, target: str = "") -> None:
        self._target = target

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        timeout = call_timeout(client_call_details.timeout)
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
        for key, value in outgoing_metadata():
            if not metadata.get_all(key):
                metadata.add(key, value)
        raw_method: str | bytes = client_call_details.method
        method = raw_method.decode() if isinstance(raw_method, bytes) else raw_method
        details = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        if method.startswith("/grpc."):  # health and reflection: no span
            return await continuation(details, request)
        with attempt(method, self._target, timeout) as current:
            for key, value in current.carrier.items():
                metadata.add(key, value)
            call = await continuation(details, request)
            await call  # the span covers the answer
            return call


CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
"""Keepalive at 30 s (servers allow pings every 5 s, so no GOAWAY); retries are not
done by the channel: the retry policy lives in one layer of :mod:`mesh`. Reconnects back
off to at most 1 s (gRPC's default grows to 120 s), so a restarted service is used again
within about a second: the chaos suite measured 6-14 s of extra outage without this."""


def describe_failure(exc: Exception) -> str:
    """One line for a failed downstream call: status code and details, or the error text."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def open_channel(
    target: str, transport: Transport = PLAINTEXT, *, server: str | None = None
) -> grpc.aio.Channel:
    """A channel to ``target`` (``host:port``) with the mesh interceptor, over ``transport``.

    Processes pass their own transport (``Transport.of(settings)``); the plaintext default
    serves in-process tests, and a server with TLS on refuses it at the handshake. With
    TLS, the server's certificate must name ``server`` (a service name), or the target's
    host when None.
    """
    return transport.channel(
        target,
        server=server,
        options=CHANNEL_OPTIONS,
        interceptors=[_ContextInterceptor(target)],
    )


async def connect_eagerly(channels: list[grpc.aio.Channel], timeout_s: float = 2.0) -> None:
    """Open the connections of ``channels`` now, so the first request does not pay for it.

    A downstream that is not up yet is not an error: its channel connects on first use.
    """

    async def ready(channel: grpc.aio.Channel) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.channel_ready(), timeout_s)

    await asyncio.gather(*(ready(c) for c in channels))


CALL_FAILURES: tuple[type[Exception], ...] = (
    grpc.aio.AioRpcError,
    DeadlineExceeded,
    CircuitOpen,
    BulkheadFull,
)
"""What a guarded call can fail with: the downstream's status, or not sent at all."""


@dataclass(frozen=True)
class CallPolicy:
    """How calls to one downstream are guarded. Defaults suit calls inside a 100 ms request.

    Attributes:
        max_attempts: first try plus retries, at most.
        backoff_base_s / backoff_cap_s: full-jitter exponential backoff between attempts.
        retry_ratio: retry budget, as a share of requests over the breaker window.
        max_in_flight: bulkhead size; more concurrent calls fail fast.
        fail_max / min_streak_s / failure_rate / window_s / min_calls / reset_timeout_s:
            the breaker (:class:`mesh.resilience.AsyncBreaker`). A streak of ``fail_max``
            failures opens it only once it has lasted ``min_streak_s``: at 100 requests/s,
            five calls that time out together in a 30 ms stall opened it for 2 s, which
            degraded about 200 answers (issue 15's fourth round, docs/performance.md).
    """

    max_attempts: int = 2
    backoff_base_s: float = 0.002
    backoff_cap_s: float = 0.010
    retry_ratio: float = 0.2
    max_in_flight: int = 64
    fail_max: int = 5
    min_streak_s: float = 0.25
    failure_rate: float = 0.3
    window_s: float = 10.0
    min_calls: int = 20
    reset_timeout_s: float = 2.0


def metered_breaker(
    name: str, policy: CallPolicy = CallPolicy(), clock: Callable[[], float] = time.monotonic
) -> AsyncBreaker:
    """A breaker named ``name`` with ``policy``'s settings whose state is exported
    (``recmesh_breaker_state`` and its transitions, :class:`mesh.metrics.BreakerMetrics`)."""
    breaker = AsyncBreaker(
        name,
        fail_max=policy.fail_max,
        min_streak_s=policy.min_streak_s,
        failure_rate=policy.failure_rate,
        window_s=policy.window_s,
        min_calls=policy.min_calls,
        reset_timeout_s=policy.reset_timeout_s,
        clock=clock,
    )
    breaker.add_listener(BreakerMetrics())
    BREAKER_STATE.labels(name).set(0)
    return breaker


class Downstream(Generic[StubT]):
    """One downstream service: its channel, stub and the guards every call goes through.

    ``await downstream.call(downstream.stub.Method, request, cap_s=budget)`` runs, in this
    order: the bulkhead (fail fast when ``max_in_flight`` calls are out), the circuit
    breaker (fail fast while open), the call itself (timeout from the request budget, see
    :class:`_ContextInterceptor`), and — only for retryable failures, only while the retry
    budget and the request deadline allow — one more attempt after a jittered backoff.
    This is the only retry layer of the mesh: channels have gRPC retries disabled.

    Args:
        name: the downstream's name in metrics, logs and errors.
        stub: the generated stub over ``channel`` (or any object with the same async
            methods, e.g. :class:`mesh.local.LocalStub`).
        channel: the channel ``stub`` uses, closed by :meth:`close`; ``None`` in-process.
        policy: the guards' settings.
        clock: monotonic clock for the breaker and budget (tests inject one).
        rng: uniform [0, 1) source for backoff jitter.
    """

    def __init__(
        self,
        name: str,
        stub: StubT,
        *,
        channel: grpc.aio.Channel | None = None,
        policy: CallPolicy = CallPolicy(),
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.policy = policy
        self.channel = channel
        self.stub = stub
        self.breaker = metered_breaker(name, policy, clock)
        self.retry_budget = RetryBudget(policy.retry_ratio, policy.window_s, clock=clock)
        self.bulkhead = Bulkhead(name, policy.max_in_flight)
        self._rng = rng

    @classmethod
    def open(
        cls,
        name: str,
        target: str,
        stub_factory: Callable[[grpc.aio.Channel], StubT],
        *,
        transport: Transport = PLAINTEXT,
        server: str | None = None,
        pipe: bool = False,
        policy: CallPolicy = CallPolicy(),
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> Downstream[StubT]:
        """The downstream at ``target`` (``host:port``) over a new :func:`open_channel` of
        ``transport``; with TLS its certificate must name ``server`` (default ``name``).
        With ``pipe`` its calls travel through one stream (:class:`mesh.pipe.PipeStub`,
        standing for the stub ``stub_factory`` makes), else one unary call each."""
        channel = open_channel(target, transport, server=server or name)
        stub: Any = (
            PipeStub(channel, service_of(stub_factory), target) if pipe else stub_factory(channel)
        )
        return cls(name, stub, channel=channel, policy=policy, clock=clock, rng=rng)

    def background(self) -> Downstream[StubT]:
        """The same downstream behind guards of its own (breaker, retry budget, bulkhead),
        named ``<name>-background``: for work off the request path (refreshes of caches),
        so that the request path's failures under load (tight budgets) do not open a
        breaker that stops the refreshes, nor the refreshes' failures the requests. It
        shares this one's channel and does not own it (closing it is this one's job)."""
        return Downstream(f"{self.name}-background", self.stub, policy=self.policy)

    async def _attempt(self, method: Callable[..., Awaitable[R]], request: Any, cap_s: float) -> R:
        try:
            result = await self.breaker.call(lambda: method(request, timeout=cap_s))
        except grpc.aio.AioRpcError as exc:
            DOWNSTREAM_CALLS.labels(self.name, exc.code().name).inc()
            raise
        DOWNSTREAM_CALLS.labels(self.name, "OK").inc()
        return result

    async def call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        cap_s: float,
        idempotent: bool = False,
    ) -> R:
        """Call ``method(request)``; each attempt waits at most ``cap_s`` seconds.

        Raises:
            CircuitOpen / BulkheadFull: the call was not sent (both are ``Unavailable``).
            DeadlineExceeded: the request budget was spent before an attempt.
            grpc.aio.AioRpcError: the downstream's answer, once no retry is allowed.
        """
        self.retry_budget.record_request()
        tracing.annotate(breaker_state=self.breaker.state)
        attempt = 1
        while True:
            try:
                return await self.bulkhead.run(lambda: self._attempt(method, request, cap_s))
            except (CircuitOpen, BulkheadFull) as exc:
                reason = "breaker_open" if isinstance(exc, CircuitOpen) else "bulkhead_full"
                DOWNSTREAM_REJECTED.labels(self.name, reason).inc()
                tracing.annotate(rejected=reason)
                raise
            except grpc.aio.AioRpcError as exc:
                delay = backoff_s(
                    attempt, self.policy.backoff_base_s, self.policy.backoff_cap_s, self._rng
                )
                budget = budget_var.get()
                time_left = budget is None or budget.remaining() - delay > 2 * CALL_MARGIN_S
                if not (
                    attempt < self.policy.max_attempts
                    and is_retryable(exc, idempotent)
                    and time_left
                    and self.retry_budget.try_spend()
                ):
                    raise
            DOWNSTREAM_RETRIES.labels(self.name).inc()
            tracing.annotate(retries=attempt)
            await asyncio.sleep(delay)
            attempt += 1

    async def connect(self) -> None:
        """Open the connection now (start-up) unless in-process; see :func:`connect_eagerly`."""
        if self.channel is not None:
            await connect_eagerly([self.channel])

    async def close(self) -> None:
        if isinstance(self.stub, PipeStub):
            await self.stub.close()
        if self.channel is not None:
            await self.channel.close()
