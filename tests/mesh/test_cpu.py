"""CPU metering per coroutine and the per-tenant account (mesh.cpu)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from prometheus_client import REGISTRY

from mesh.cpu import CpuAccount, CpuMeter, billed


def burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


async def work(burn_s: float, steps: int) -> str:
    for _ in range(steps):
        burn(burn_s)
        await asyncio.sleep(0.005)
    return "done"


def cpu_metric(service: str, tenant: str) -> float:
    labels = {"service": service, "tenant": tenant}
    return REGISTRY.get_sample_value("recmesh_tenant_cpu_seconds_total", labels) or 0.0


async def test_each_meter_counts_only_its_own_steps_on_a_shared_loop() -> None:
    heavy, light = CpuMeter(), CpuMeter()
    results = await asyncio.gather(heavy.run(work(0.01, 5)), light.run(work(0.002, 5)))
    assert list(results) == ["done", "done"]
    # While one coroutine awaited, the other burnt CPU on the same thread: not counted.
    assert 0.05 <= heavy.seconds < 0.05 + 0.01
    assert 0.01 <= light.seconds < 0.01 + 0.01


async def test_a_meter_counts_work_that_raises_or_is_cancelled() -> None:
    async def fails() -> None:
        burn(0.005)
        await asyncio.sleep(0)
        raise ValueError("no")

    meter = CpuMeter()
    with pytest.raises(ValueError, match="no"):
        await meter.run(fails())
    assert meter.seconds >= 0.005

    meter = CpuMeter()
    task = asyncio.create_task(meter.run(work(0.005, 100)))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 0.005 <= meter.seconds < 0.5


async def test_work_handed_to_an_executor_is_counted_where_it_runs() -> None:
    meter = CpuMeter()

    async def hands_off() -> None:
        await asyncio.get_running_loop().run_in_executor(None, meter.call, burn, 0.02)

    await meter.run(hands_off())
    assert meter.seconds >= 0.02


async def test_an_account_reports_a_calls_cpu_plus_the_background_work_it_owes() -> None:
    service = f"svc-{uuid.uuid4().hex[:6]}"
    account = CpuAccount(service)
    refreshes: list[asyncio.Task[str]] = []

    async def handler() -> str:
        burn(0.005)
        # Background work for the tenant, started by this call and run in its own task.
        refreshes.append(asyncio.create_task(billed("acme", work(0.01, 1))))
        await asyncio.sleep(0)
        return "answer"

    result, first = await account.serve("acme", handler())
    assert result == "answer"
    assert 0.005 <= first < 0.01  # the refresh has not run yet: owed, not reported
    await refreshes[0]
    assert account.owed("acme") >= 0.01
    result, second = await account.serve("acme", handler())
    assert second >= 0.015  # this call's own and the first refresh
    assert account.owed("acme") == 0.0
    await refreshes[1]
    # Every second counted in the metric as it was spent, under the tenant's label.
    assert cpu_metric(service, "acme") == pytest.approx(first + second + account.owed("acme"))
    assert cpu_metric(service, "demo") == 0.0


async def test_background_work_outside_a_served_call_is_left_unmetered() -> None:
    coroutine = work(0.0, 1)
    assert billed("acme", coroutine) is coroutine
    await coroutine
