"""CPU time spent for each tenant: a call's own, metered step by step, and the background
work done on a tenant's behalf (``docs/usage.md``).

**Why steps.** A service's handlers share one event-loop thread. The thread's CPU clock
read around a whole handler would also count every other call that ran while it awaited.
:class:`CpuMeter` instead reads ``time.thread_time()`` around each *step* of a coroutine,
from when the loop resumes it to when it suspends again, and sums them: the CPU the
thread spent running that coroutine's own code and everything it calls synchronously
(protobuf, numpy, ONNX Runtime and FAISS, each with one thread in this mesh), and nothing
of the other calls'. Each step costs two clock reads (about 0.3 µs each).

**Executors.** Work a coroutine hands to another thread runs outside its steps; measure it
there with :meth:`CpuMeter.call` (``loop.run_in_executor(pool, meter.call, fn, ...)``).
Retrieval and ranking hand no request work to threads today.

**Shared work.** Work done once for several calls of one tenant (a refresh a request
started: the live catalog, trending items, item counters, item changes) is not any one
call's: :func:`billed` meters it in its own task and the service's :class:`CpuAccount`
owes it to the tenant, added to that tenant's next answer (:meth:`CpuAccount.serve`). Work
shared by calls of several tenants (a batch across tenants; none exists today) should be
split in proportion to each tenant's share of it (rows of the batch), never charged to the
call that happened to run it.

Every second of either kind is counted at once in
``recmesh_tenant_cpu_seconds_total{service, tenant}``; what the answers carry reaches the
tenant's usage through the gateway (``Cost.cpu_us``, ``gateway.usage``).
"""

from __future__ import annotations

import contextvars
import threading
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, ParamSpec, TypeVar

from mesh.metrics import TENANT_CPU_SECONDS

R = TypeVar("R")
P = ParamSpec("P")

_account: contextvars.ContextVar[CpuAccount | None] = contextvars.ContextVar(
    "recmesh_cpu_account", default=None
)


class CpuMeter:
    """Sums the CPU seconds of the work it runs (see the module docstring)."""

    __slots__ = ("_lock", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def run(self, work: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
        """``work``, metered: awaiting the result runs it and adds the CPU of each of its
        steps on the awaiting thread to :attr:`seconds`, whether it returns or raises."""
        return _metered(work, self)

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` on the calling thread (an executor's), its CPU added."""
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self.seconds += spent


@types.coroutine
def _step_through(work: Coroutine[Any, Any, R], meter: CpuMeter) -> Generator[Any, Any, R]:
    clock = time.thread_time
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        started = clock()
        try:
            yielded = work.send(sent) if thrown is None else work.throw(thrown)
        except StopIteration as done:
            meter.seconds += clock() - started
            result: R = done.value
            return result
        except BaseException:
            meter.seconds += clock() - started
            raise
        meter.seconds += clock() - started
        try:
            sent, thrown = (yield yielded), None
        except GeneratorExit:
            work.close()
            raise
        except BaseException as exc:  # cancellation and the like: the work decides
            sent, thrown = None, exc


async def _metered(work: Coroutine[Any, Any, R], meter: CpuMeter) -> R:
    return await _step_through(work, meter)


class CpuAccount:
    """One service's CPU per tenant: counted in ``recmesh_tenant_cpu_seconds_total`` as it
    is spent, and reported to the tenant in its answers (:meth:`serve`).

    Args:
        service: the metric's ``service`` label ("retrieval", "ranking").
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self._owed: dict[str, float] = {}

    async def serve(self, tenant: str, work: Coroutine[Any, Any, R]) -> tuple[R, float]:
        """Run ``work``, a call's handler body for ``tenant``, metered; its result and the
        CPU seconds its answer should report: its own plus what ``tenant``'s background
        work cost since its previous answer (:func:`billed` work the call starts is owed to
        this account). The call's CPU is counted in the metric even when ``work`` raises
        (then nothing is reported and what is owed stays owed)."""
        meter = CpuMeter()
        token = _account.set(self)
        try:
            result = await meter.run(work)
        finally:
            _account.reset(token)
            TENANT_CPU_SECONDS.labels(self.service, tenant or "-").inc(meter.seconds)
        return result, meter.seconds + self._owed.pop(tenant, 0.0)

    def owe(self, tenant: str, seconds: float) -> None:
        """Count ``seconds`` of background work for ``tenant`` and owe them to its next
        answer."""
        TENANT_CPU_SECONDS.labels(self.service, tenant or "-").inc(seconds)
        self._owed[tenant] = self._owed.get(tenant, 0.0) + seconds

    def owed(self, tenant: str) -> float:
        """Seconds owed to ``tenant``'s next answer."""
        return self._owed.get(tenant, 0.0)

    async def _background(self, tenant: str, work: Coroutine[Any, Any, R]) -> R:
        meter = CpuMeter()
        try:
            return await meter.run(work)
        finally:
            self.owe(tenant, meter.seconds)


def billed(tenant: str, work: Coroutine[Any, Any, R]) -> Coroutine[Any, Any, R]:
    """``work``, background work for ``tenant`` started while serving a call, metered and
    owed to ``tenant`` in the account serving that call (:meth:`CpuAccount.serve`); outside
    of one, ``work`` unchanged. Start it in a task of its own
    (``asyncio.create_task(billed(tenant, refresh()), context=detached())``)."""
    account = _account.get()
    if account is None or not tenant:
        return work
    return account._background(tenant, work)
