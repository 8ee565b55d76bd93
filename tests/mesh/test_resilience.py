"""The asyncio breaker adapter, retry budget and bulkhead, under concurrent coroutines."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh.resilience import (
    AsyncBreaker,
    Bulkhead,
    BulkheadFull,
    CircuitOpen,
    RetryBudget,
    counts_as_failure,
)
from mesh.testing import ManualClock


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "test")


async def outcome(breaker: AsyncBreaker, fail: bool, code: grpc.StatusCode) -> str:
    async def call() -> str:
        await asyncio.sleep(0)
        if fail:
            raise rpc_error(code)
        return "ok"

    try:
        return await breaker.call(call)
    except CircuitOpen:
        return "rejected"
    except grpc.aio.AioRpcError:
        return "failed"


async def test_half_the_calls_failing_opens_on_rate_not_on_consecutive_count() -> None:
    clock = ManualClock(1000.0)
    breaker = AsyncBreaker("down", fail_max=5, failure_rate=0.5, min_calls=20, clock=clock)
    # Alternating failures never reach 5 in a row: only the rate can open the breaker.
    waves = []
    for _ in range(4):
        waves.append(
            await asyncio.gather(
                *(outcome(breaker, i % 2 == 0, grpc.StatusCode.UNAVAILABLE) for i in range(10))
            )
        )
    assert breaker.state == "open"
    assert "rejected" not in waves[0] + waves[1]
    assert waves[3] == ["rejected"] * 10


async def test_consecutive_failures_open_before_the_window_fills() -> None:
    breaker = AsyncBreaker("down", fail_max=3, min_calls=100, clock=ManualClock(1000.0))
    for _ in range(3):
        await outcome(breaker, True, grpc.StatusCode.UNAVAILABLE)
    assert breaker.state == "open"


async def test_a_blip_of_failures_does_not_open_a_breaker_that_wants_a_lasting_streak() -> None:
    clock = ManualClock(1000.0)
    breaker = AsyncBreaker("down", fail_max=3, min_streak_s=0.25, min_calls=100, clock=clock)
    # Calls in flight together time out together in a 30 ms stall: five in a row, then the
    # stall is over and the next call succeeds.
    for _ in range(5):
        clock.advance(0.006)
        assert await outcome(breaker, True, grpc.StatusCode.DEADLINE_EXCEEDED) == "failed"
    assert breaker.state == "closed"
    assert await outcome(breaker, False, grpc.StatusCode.OK) == "ok"
    # A downstream that stays down: the streak lasts, and the breaker opens once it has
    # lasted 0.25 s (failures 62.5 ms apart: the fifth is 0.25 s after the first).
    states = []
    for _ in range(6):
        clock.advance(0.0625)
        await outcome(breaker, True, grpc.StatusCode.DEADLINE_EXCEEDED)
        states.append(breaker.state)
    assert states == ["closed"] * 4 + ["open"] * 2


async def test_cancellations_and_client_errors_are_not_failures() -> None:
    breaker = AsyncBreaker("down", fail_max=2, min_calls=2, clock=ManualClock(1000.0))
    for _ in range(10):
        await outcome(breaker, True, grpc.StatusCode.INVALID_ARGUMENT)

    async def hang() -> None:
        await asyncio.sleep(10)

    for _ in range(5):
        task = asyncio.create_task(breaker.call(hang))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert breaker.state == "closed"
    assert not counts_as_failure(rpc_error(grpc.StatusCode.NOT_FOUND))
    assert counts_as_failure(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))


async def test_half_open_lets_one_probe_through_and_closes_on_success() -> None:
    clock = ManualClock(1000.0)
    breaker = AsyncBreaker("down", fail_max=1, reset_timeout_s=2.0, clock=clock)
    await outcome(breaker, True, grpc.StatusCode.UNAVAILABLE)
    assert await outcome(breaker, False, grpc.StatusCode.OK) == "rejected"
    clock.now += 2.5
    release = asyncio.Event()

    async def slow_probe() -> str:
        await release.wait()
        return "ok"

    probe = asyncio.create_task(breaker.call(slow_probe))
    await asyncio.sleep(0)
    assert breaker.state == "half-open"
    assert await outcome(breaker, False, grpc.StatusCode.OK) == "rejected"
    release.set()
    assert await probe == "ok"
    assert breaker.state == "closed"


async def test_failed_probe_reopens() -> None:
    clock = ManualClock(1000.0)
    breaker = AsyncBreaker("down", fail_max=1, reset_timeout_s=1.0, clock=clock)
    await outcome(breaker, True, grpc.StatusCode.UNAVAILABLE)
    clock.now += 1.5
    assert await outcome(breaker, True, grpc.StatusCode.UNAVAILABLE) == "failed"
    assert breaker.state == "open"
    assert await outcome(breaker, False, grpc.StatusCode.OK) == "rejected"


def test_retry_budget_caps_retries_at_the_ratio() -> None:
    clock = ManualClock(1000.0)
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_retries=0, clock=clock)
    granted = 0
    for _ in range(1000):
        budget.record_request()
        granted += budget.try_spend()
        clock.now += 0.001
    assert 190 <= granted <= 201


async def test_bulkhead_fails_fast_when_full() -> None:
    bulkhead = Bulkhead("down", limit=2)
    gate = asyncio.Event()

    async def wait() -> str:
        await gate.wait()
        return "done"

    held = [asyncio.create_task(bulkhead.run(wait)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFull):
        await bulkhead.run(wait)
    gate.set()
    assert await asyncio.gather(*held) == ["done", "done"]
    assert await bulkhead.run(wait) == "done"
