"""Reports computed in a worker process, so that assignment never waits on one.

A report decodes and aggregates the tenant's whole log (seconds for a million events of
CPU-bound Python and numpy). On the service's event loop, or in a thread holding the GIL,
that would delay ``Assign``, which the gateway gives 5 ms before it falls back to the
control variants. So :class:`Reports` hands each report to one worker process (spawned at
the first report, kept after, at a lower CPU priority: ``WORKER_NICENESS``). The worker
keeps each tenant's :class:`LogTable` between reports, so a later report reads only the
entries appended since (the table is rebuilt when the tenant's audit stream grew or its log
was trimmed: ``report.refresh``), and the last report of each experiment, answered again
while the log gained nothing. Reports run one at a time; a worker that died is replaced at
the next report.

Load a caller can put on it is bounded: identical requests made while one is computed
(same tenant and spec) share its result instead of queuing again, and at most
``max_pending`` distinct reports wait or run; one more is RESOURCE_EXHAUSTED (429) with a
``Retry-After``.

What it costs: the worker's memory holds the tables of the ``MAX_TABLES`` tenants reported
on most recently (about 75 bytes per event of the log; a table of 1M events is about
280 MiB: see ``docs/experiments.md``, "Report"); an older tenant's table is dropped and
read again in full at its next report.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from recmesh.experiment.v1 import experiment_pb2

from mesh import redis as mesh_redis
from mesh.errors import FailedPrecondition, ResourceExhausted, Unavailable
from services.experiment.report import LogTable, ReportSpec, build_report

_TABLES: dict[str, LogTable] = {}
"""The worker process's tables, by tenant."""
_LAST: dict[tuple[str, ReportSpec], experiment_pb2.Report] = {}
"""The worker's last report of each tenant and spec (answered again while the log gained
nothing; dropped with the tenant's table when that is rebuilt)."""


MAX_TABLES = 4
"""Tenants whose log tables the worker keeps (the most recently reported)."""

WORKER_NICENESS = 10
"""How much lower the worker's CPU priority is than the service's: on a busy machine the
scheduler then runs the service's ``Assign`` calls before the report's decoding."""


def _lower_priority() -> None:
    os.nice(WORKER_NICENESS)


def report_in_worker(redis_url: str, tenant: str, spec: ReportSpec, page: int) -> bytes:
    """The serialized report of ``spec`` for ``tenant`` (runs in the worker process)."""

    async def run() -> experiment_pb2.Report:
        client = mesh_redis.connect(redis_url)
        try:
            report, _TABLES[tenant] = await build_report(
                client, tenant, spec, _TABLES.pop(tenant, None), page, _LAST.get((tenant, spec))
            )
        finally:
            await client.aclose()
        if report.rebuilt:
            _forget_reports(tenant)
        _LAST[(tenant, spec)] = report
        while len(_TABLES) > MAX_TABLES:  # the least recently reported tenant goes
            oldest = next(iter(_TABLES))
            del _TABLES[oldest]
            _forget_reports(oldest)
        return report

    return asyncio.run(run()).SerializeToString()


def _forget_reports(tenant: str) -> None:
    for key in [key for key in _LAST if key[0] == tenant]:
        del _LAST[key]


class Reports:
    """Experiment reports from the log in Redis at ``redis_url``, computed by one worker
    process (module docstring), reading ``page`` entries per ``XRANGE``."""

    def __init__(self, redis_url: str, page: int = 5000, max_pending: int = 8) -> None:
        self._redis_url = redis_url
        self._page = page
        self._max_pending = max_pending
        self._pool: ProcessPoolExecutor | None = None
        self._inflight: dict[tuple[str, ReportSpec], asyncio.Future[experiment_pb2.Report]] = {}

    async def report(self, tenant: str, spec: ReportSpec) -> experiment_pb2.Report:
        """The report of ``spec``'s experiment for ``tenant``.

        Raises:
            FailedPrecondition: the service was started without ``REDIS_URL``.
            Unavailable: the worker process died (it is replaced at the next report).
            ResourceExhausted: ``max_pending`` other reports are waiting or running.
            redis.ConnectionError / redis.TimeoutError: Redis could not be read.
        """
        if not self._redis_url:
            raise FailedPrecondition("the experiment service has no REDIS_URL to read the log")
        key = (tenant, spec)
        running = self._inflight.get(key)
        if running is not None:  # the same report is being computed: share it
            return await asyncio.shield(running)
        if len(self._inflight) >= self._max_pending:
            raise ResourceExhausted(
                f"{len(self._inflight)} reports are being computed; ask again shortly",
                retry_after_s=5.0,
            )
        future: asyncio.Future[experiment_pb2.Report] = asyncio.ensure_future(
            self._compute(tenant, spec)
        )
        self._inflight[key] = future
        future.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    async def _compute(self, tenant: str, spec: ReportSpec) -> experiment_pb2.Report:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority,
            )
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            raw = await loop.run_in_executor(
                pool, report_in_worker, self._redis_url, tenant, spec, self._page
            )
        except BrokenProcessPool as exc:
            # Every report waiting on the dead worker lands here; only the first replaces
            # the pool, and none touches a new pool another report has started since.
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise Unavailable("the report worker died; ask again") from exc
        return experiment_pb2.Report.FromString(raw)

    async def close(self) -> None:
        """Stop the worker now: a report it is computing is abandoned (its caller gets
        UNAVAILABLE), so a stopping service never waits for a cold report."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
