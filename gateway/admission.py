"""Admission control: a recommendation is taken or shed before any downstream work.

Over capacity a request that is taken anyway waits in queues (the gateway's loop, the
services' loops, the sockets between them) and answers late or degraded; worse, it makes
every request behind it late. So the gateway refuses the excess at the door, cheaply
(no downstream call, no span of work), with ``503`` and ``Retry-After``
(:class:`~mesh.errors.Overloaded`; gRPC ``UNAVAILABLE`` with a ``retry-after`` trailer),
and counts each refusal (``recmesh_gateway_shed_total{tenant,reason}``). Two signals:

* **In flight against an adaptive limit** (``reason="concurrency"``). The limit follows
  additive increase, multiplicative decrease on the answers' latency: an answer within
  ``target_s`` raises the limit by ``1 / limit`` (one per "round" of the limit's answers)
  when at least half the limit was in flight (an idle gateway's answers say nothing about
  how much more it could take); a slower one lowers it to ``limit * backoff``, at most
  once per ``cooldown_s`` (one slow burst is one decrease, not one per answer in it). The
  limit stays in ``[min_limit, max_limit]``. By Little's law the work in flight the
  machine can finish in time is its throughput times the target latency, so the limit
  settles near that, measured, whatever the cost of an answer is today.
* **The event loop's lag** (``reason="loop_lag"``). A sampler task sleeps ``interval_s``
  and measures how late it wakes (an exponentially weighted mean). When the loop itself is
  behind by more than ``max_lag_s``, everything waiting on it (requests parsed but not yet
  handled, answers from downstream not yet read) is that late already: new requests are
  refused until it catches up.

A request admitted is released when its answer is ready (served, degraded or failed); its
latency feeds the limit only when it was answered, degraded or not (an error says nothing
about how long answers take).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from mesh.errors import Overloaded

SHED = Counter(
    "recmesh_gateway_shed_total",
    "Recommendations refused at admission (503 with Retry-After), by tenant and reason",
    ["tenant", "reason"],
)
LIMIT = Gauge("recmesh_gateway_admission_limit", "Adaptive limit of recommendations in flight")
IN_FLIGHT = Gauge("recmesh_gateway_in_flight", "Recommendations admitted and not yet answered")
LOOP_LAG = Gauge("recmesh_gateway_loop_lag_seconds", "Event loop lag (exponentially weighted mean)")


@dataclass(frozen=True)
class AdmissionConfig:
    """The admission controller's knobs (the first five and ``max_lag_s`` from
    ``GatewaySettings``, ``RECMESH_GATEWAY_ADMISSION_*``; the others fixed).

    Attributes:
        initial_limit: the limit before any answer was measured.
        min_limit: the limit never goes below it (some work always gets through).
        max_limit: ... nor above it (0: no limit at all, admission by loop lag only).
        target_s: an answer within it counts as on time and raises the limit.
        backoff: factor of a decrease, in ``(0, 1)``.
        cooldown_s: at most one decrease per this long.
        max_lag_s: loop lag above which new requests are refused (0: never).
        interval_s: how often the loop's lag is sampled.
        retry_after_s: what a refusal tells the client to wait.
    """

    initial_limit: float = 32.0
    min_limit: float = 8.0
    max_limit: float = 256.0
    target_s: float = 0.050
    backoff: float = 0.9
    cooldown_s: float = 0.1
    max_lag_s: float = 0.025
    interval_s: float = 0.02
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.min_limit <= self.initial_limit or (
            self.max_limit > 0 and self.initial_limit > self.max_limit
        ):
            raise ValueError("need 0 < min_limit <= initial_limit <= max_limit (or max_limit 0)")
        if not 0.0 < self.backoff < 1.0:
            raise ValueError("backoff must be in (0, 1)")
        if self.target_s <= 0 or self.interval_s <= 0 or self.retry_after_s <= 0:
            raise ValueError("target_s, interval_s and retry_after_s must be positive")


class AdmissionControl:
    """Takes or sheds each recommendation (see the module docstring).

    :meth:`start` begins sampling the loop's lag (on the running loop) and :meth:`stop`
    ends it; without it the lag is taken as 0. ``clock`` is monotonic seconds.
    """

    def __init__(
        self, config: AdmissionConfig, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.config = config
        self.limit = config.initial_limit
        self.in_flight = 0
        self.lag_s = 0.0
        self._clock = clock
        self._last_decrease = -float("inf")
        self._sampler: asyncio.Task[None] | None = None
        LIMIT.set(self.limit)

    async def start(self) -> None:
        """Start sampling the running loop's lag."""
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        """Stop the sampler."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval_s
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            late = max(0.0, loop.time() - before - interval)
            self.lag_s = 0.8 * self.lag_s + 0.2 * late
            LOOP_LAG.set(self.lag_s)

    def refusal(self) -> str | None:
        """Why a request arriving now would be refused (a ``reason`` label), or None."""
        config = self.config
        if config.max_lag_s > 0 and self.lag_s > config.max_lag_s:
            return "loop_lag"
        if config.max_limit > 0 and self.in_flight >= self.limit:
            return "concurrency"
        return None

    @contextlib.contextmanager
    def admit(self, tenant: str) -> Iterator[Ticket]:
        """Hold one place in flight for the block, or refuse.

        Raises:
            Overloaded: the limit is reached or the loop is behind (counted).
        """
        reason = self.refusal()
        if reason is not None:
            SHED.labels(tenant or "-", reason).inc()
            raise Overloaded(
                f"the gateway is over capacity ({reason.replace('_', ' ')}); retry later",
                retry_after_s=self.config.retry_after_s,
            )
        ticket = Ticket(self._clock())
        self.in_flight += 1
        IN_FLIGHT.set(self.in_flight)
        try:
            yield ticket
        finally:
            self.in_flight -= 1
            IN_FLIGHT.set(self.in_flight)
            if ticket.served:
                self.observe(self._clock() - ticket.started)

    def observe(self, latency_s: float) -> None:
        """One served answer's latency into the limit (additive increase, multiplicative
        decrease with a cool-down)."""
        config = self.config
        if latency_s <= config.target_s:
            if self.in_flight + 1 < self.limit / 2:
                return  # little in flight: an on-time answer says nothing about the limit
            self.limit = min(
                config.max_limit if config.max_limit > 0 else float("inf"),
                self.limit + 1.0 / self.limit,
            )
        else:
            now = self._clock()
            if now - self._last_decrease < config.cooldown_s:
                return
            self._last_decrease = now
            self.limit = max(config.min_limit, self.limit * config.backoff)
        LIMIT.set(self.limit)


@dataclass
class Ticket:
    """An admitted request: when it was admitted, and whether it was answered (set by the
    caller once the answer is ready; only answers' latencies move the limit)."""

    started: float
    served: bool = False
