"""Client-side resilience: circuit breaker, retry budget and bulkhead, one of each per downstream.

pybreaker (1.4) has no asyncio support: decorating an ``async def`` counts nothing, and
its ``calling()`` context counts a cancelled task as a failure. :class:`AsyncBreaker`
therefore keeps pybreaker as the state machine and listener bus (``open()``,
``half_open()``, ``close()``, ``current_state``, ``state_change`` listeners) and decides
the transitions itself:

* it opens on ``fail_max`` consecutive failures **or** on a failure *rate* of at least
  ``failure_rate`` over the last ``window_s`` seconds once ``min_calls`` calls were seen
  (a consecutive-failure counter alone never opens at 50 % errors);
* only failures that say something about the downstream count: cancellations, client
  errors (INVALID_ARGUMENT, NOT_FOUND, ...) and budgets spent before the call do not;
* after ``reset_timeout_s`` one probe call is let through (half-open); its outcome
  closes or re-opens the breaker, and calls arriving meanwhile are rejected.

All times come from an injectable monotonic clock.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pybreaker

from mesh.errors import Unavailable

T = TypeVar("T")
Clock = Callable[[], float]

CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Status codes that describe the request or the caller, not the downstream's health."""


class CircuitOpen(Unavailable):
    """The downstream's breaker is open (or probing): the call was not sent."""


class BulkheadFull(Unavailable):
    """Too many calls to the downstream are in flight: the call was not sent."""


def counts_as_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the downstream is unhealthy (and so feeds its breaker): a gRPC
    status other than a client error, or, from a store read in process, :class:`Unavailable`
    or a timeout."""
    if isinstance(exc, asyncio.CancelledError):
        return False
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() not in CLIENT_ERRORS
    return isinstance(exc, Unavailable | TimeoutError)


class AsyncBreaker:
    """A circuit breaker for coroutines, built on pybreaker's state machine.

    Args:
        name: the downstream's name (metrics, errors).
        fail_max: consecutive failures that open the breaker, once the streak has lasted
            ``min_streak_s`` (from its first failure to its latest).
        min_streak_s: how long a streak of failures must last to open the breaker. At a
            high call rate, ``fail_max`` calls in flight together fail together when the
            downstream (or this process) stalls for a few tens of milliseconds; without
            this, such a blip opens the breaker and every call fails fast for
            ``reset_timeout_s``. 0: the count alone opens it.
        failure_rate: failure share over the window that opens it.
        window_s: length of the failure-rate window.
        min_calls: calls the window must hold before the rate is judged.
        reset_timeout_s: time open before a probe is let through.
        clock: monotonic clock.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        min_streak_s: float = 0.0,
        failure_rate: float = 0.5,
        window_s: float = 10.0,
        min_calls: int = 20,
        reset_timeout_s: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max, reset_timeout=reset_timeout_s, name=name
        )
        self._min_streak_s = min_streak_s
        self._failure_rate = failure_rate
        self._window_s = window_s
        self._min_calls = min_calls
        self._reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self._consecutive = 0
        self._streak_from = 0.0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return str(self._breaker.current_state)

    def add_listener(self, listener: pybreaker.CircuitBreakerListener) -> None:
        """Subscribe to pybreaker's events (``state_change`` is the one the adapter drives)."""
        self._breaker.add_listener(listener)

    def _admit(self) -> None:
        state = self.state
        if state == "closed":
            return
        if state == "open" and self._clock() - self._opened_at >= self._reset_timeout_s:
            self._breaker.half_open()
            state = "half-open"
        if state == "half-open" and not self._probing:
            self._probing = True
            return
        raise CircuitOpen(f"circuit to {self.name} is {state}; not calling")

    def _trip(self) -> None:
        self._opened_at = self._clock()
        self._outcomes.clear()
        self._consecutive = 0
        self._breaker.open()

    def _record(self, ok: bool) -> None:
        now = self._clock()
        self._outcomes.append((now, ok))
        while self._outcomes and self._outcomes[0][0] < now - self._window_s:
            self._outcomes.popleft()
        self._consecutive = 0 if ok else self._consecutive + 1
        if self._consecutive == 1:
            self._streak_from = now
        if self.state == "half-open":
            self._probing = False
            if ok:
                self._outcomes.clear()
                self._breaker.close()
            else:
                self._trip()
            return
        if ok:
            return
        failures = sum(1 for _, good in self._outcomes if not good)
        rate_trips = (
            len(self._outcomes) >= self._min_calls
            and failures / len(self._outcomes) >= self._failure_rate
        )
        streak_trips = (
            self._consecutive >= self._breaker.fail_max
            and now - self._streak_from >= self._min_streak_s
        )
        if streak_trips or rate_trips:
            self._trip()

    async def call(self, func: Callable[[], Awaitable[T]]) -> T:
        """Await ``func()`` through the breaker.

        Raises:
            CircuitOpen: the breaker is open, or a probe is already in flight.
            Exception: whatever ``func`` raised (after it was counted, or not).
        """
        self._admit()
        was_probe = self.state == "half-open"
        try:
            result = await func()
        except BaseException as exc:
            if counts_as_failure(exc):
                self._record(False)
            elif was_probe:
                # An uncounted outcome (cancelled, client error) ends the probe without a verdict.
                self._probing = False
            raise
        self._record(True)
        return result


class RetryBudget:
    """Retries allowed as a share of requests over a sliding window (Envoy's retry budget).

    A retry may be spent while ``retries < ratio * requests + min_retries`` over the last
    ``window_s`` seconds, so retries add at most ``ratio`` to the load a downstream sees,
    whatever fails.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        window_s: float = 10.0,
        min_retries: int = 3,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._window_s = window_s
        self._min = min_retries
        self._clock = clock
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        for events in (self._requests, self._retries):
            while events and events[0] < now - self._window_s:
                events.popleft()

    def record_request(self) -> None:
        """Count one first attempt."""
        self._requests.append(self._clock())

    def counts(self) -> tuple[int, int]:
        """``(requests, retries)`` in the current window."""
        self._trim(self._clock())
        return len(self._requests), len(self._retries)

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one."""
        now = self._clock()
        self._trim(now)
        if len(self._retries) < self._ratio * len(self._requests) + self._min:
            self._retries.append(now)
            return True
        return False


class Bulkhead:
    """A cap on calls in flight to one downstream; overflow fails fast, it never queues."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.in_flight = 0

    async def run(self, func: Callable[[], Awaitable[T]]) -> T:
        """Await ``func()`` if a slot is free.

        Raises:
            BulkheadFull: ``limit`` calls are already in flight.
        """
        if self.in_flight >= self.limit:
            raise BulkheadFull(f"{self.limit} calls to {self.name} already in flight")
        self.in_flight += 1
        try:
            return await func()
        finally:
            self.in_flight -= 1


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: Callable[[], float]) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
    return float(rng() * min(cap_s, base_s * (2 ** (attempt - 1))))


def is_retryable(exc: BaseException, idempotent: bool) -> bool:
    """UNAVAILABLE is retried for every call; idempotent reads also retry ABORTED."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return False
    codes = {grpc.StatusCode.UNAVAILABLE}
    if idempotent:
        codes.add(grpc.StatusCode.ABORTED)
    return exc.code() in codes
