"""Health from components: the process is SERVING only while every component check passes.

A component is a named async check (Redis answers PING, artifacts are loaded...). The
monitor runs them periodically and drives the standard ``grpc.health.v1`` servicer for
the overall server ("") and each registered service name. On shutdown it flips to
NOT_SERVING for good, so load balancers stop sending traffic before the port closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthCheck:
    """A component check: ``probe`` returns normally when healthy and raises otherwise."""

    name: str
    probe: Callable[[], Awaitable[None]]
    timeout_s: float = 0.5


class HealthMonitor:
    """Runs component checks and publishes the result on a health servicer."""

    def __init__(
        self,
        checks: Sequence[HealthCheck],
        service_names: Sequence[str],
        interval_s: float = 1.0,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._checks = list(checks)
        self._names = ["", *service_names]
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self.failures: dict[str, str] = {}

    async def run_checks(self) -> bool:
        """Run every check once, publish the outcome and return whether all passed."""
        failures: dict[str, str] = {}
        for check in self._checks:
            try:
                await asyncio.wait_for(check.probe(), check.timeout_s)
            except Exception as exc:  # a failing probe of any kind means unhealthy
                failures[check.name] = f"{type(exc).__name__}: {exc}"
        if failures != self.failures:
            if failures:
                log.warning("unhealthy", extra={"fields": {"failures": failures}})
            else:
                log.info("healthy")
        self.failures = failures
        await self._publish(not failures)
        return not failures

    async def _publish(self, healthy: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy and not self._draining
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self.servicer.set(name, status)

    async def starting(self) -> None:
        """Report NOT_SERVING until :meth:`start`: gRPC's health servicer begins with the
        whole server (``""``) SERVING, which a process still starting up is not."""
        await self._publish(False)

    async def start(self) -> None:
        """Check once now, then keep checking in the background."""
        await self.run_checks()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.run_checks()

    async def drain(self) -> None:
        """Report NOT_SERVING from now on and stop checking."""
        self._draining = True
        if self._task is not None:
            self._task.cancel()
        await self.servicer.enter_graceful_shutdown()
