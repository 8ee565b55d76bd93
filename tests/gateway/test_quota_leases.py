"""The gateway's quota leases against a real quota service and Redis, in-process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from gateway.quota import Admission, QuotaLeases
from mesh.client import CALL_FAILURES, Downstream
from mesh.context import tenant_var
from mesh.ports import free_port
from mesh.server import MeshServer
from mesh.testing import ManualClock, built_server, serving
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import reset_quota

TENANTS = {"bulk": (1000.0, 2000), "forty": (1.0, 40), "trio": (1.0, 3)}
"""name -> (rate/s, burst). ``bulk`` is never limited here; the others refill about one
unit per second, so a test sees their burst and little more."""


def registry(path: Path) -> Path:
    """The tenant registry of :data:`TENANTS` (key = name), written at ``path``."""
    tenants = {
        name: {
            "api_key_sha256": hashlib.sha256(name.encode()).hexdigest(),
            "rate": rate,
            "burst": burst,
        }
        for name, (rate, burst) in TENANTS.items()
    }
    path.write_text(json.dumps({"tenants": tenants}))
    return path


@pytest.fixture(scope="module")
async def quota_server(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MeshServer]:
    path = registry(tmp_path_factory.mktemp("leases") / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=path)
    )
    async with serving(server):
        yield server


@pytest.fixture
async def quota(
    quota_server: MeshServer, redis_url: str
) -> AsyncIterator[Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]]:
    """The quota service behind a downstream of its own name (its attempts counted alone);
    every tenant's bucket full."""
    for tenant in TENANTS:
        await reset_quota(redis_url, tenant)
    downstream = Downstream.open(
        f"quota-{uuid.uuid4().hex[:8]}",
        f"127.0.0.1:{quota_server.port}",
        quota_pb2_grpc.QuotaServiceStub,
    )
    yield downstream
    await downstream.close()


def calls(downstream: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]) -> int:
    """Calls ``downstream`` answered so far (the gateway's own attempts metric)."""
    labels = {"downstream": downstream.name, "code": "OK"}
    return int(REGISTRY.get_sample_value("recmesh_downstream_attempts_total", labels) or 0)


def leases(
    downstream: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
    clock: ManualClock,
    lease_max: int = 32,
    lease_ttl_s: float = 0.1,
    refresh_ahead_s: float = 0.03,
) -> QuotaLeases:
    return QuotaLeases(
        downstream,
        lease_max=lease_max,
        lease_ttl_s=lease_ttl_s,
        refresh_ahead_s=refresh_ahead_s,
        cap_s=2.0,
        clock=clock,
    )


def request(quota: QuotaLeases, tenant: str) -> asyncio.Task[Admission]:
    """One request of ``tenant``, in a task of its own as the gateway runs each request."""

    async def admit() -> Admission:
        tenant_var.set(tenant)
        return await quota.acquire(tenant)

    return asyncio.create_task(admit())


async def granted(quota_server: MeshServer, tenant: str) -> int:
    """Units the quota service handed out for ``tenant`` this hour."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{quota_server.port}") as channel:
        reply = await quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
            quota_pb2.GetUsageRequest(tenant=tenant)
        )
    return reply.usage[0].allowed


async def test_concurrent_requests_of_a_busy_tenant_share_few_calls(
    quota_server: MeshServer, quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]
) -> None:
    before = await granted(quota_server, "bulk")
    shared = leases(quota, ManualClock(1000.0))
    admissions = await asyncio.gather(*(request(shared, "bulk") for _ in range(50)))
    assert all(a.allowed for a in admissions)
    assert calls(quota) <= 5
    assert len(admissions) <= await granted(quota_server, "bulk") - before


async def test_concurrent_requests_beyond_the_burst_are_denied(
    quota_server: MeshServer, quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]
) -> None:
    before = await granted(quota_server, "forty")
    # A long lease, so the tenant's rate does not cap its size.
    shared = leases(quota, ManualClock(1000.0), lease_ttl_s=100.0)
    admissions = await asyncio.gather(*(request(shared, "forty") for _ in range(50)))
    allowed = sum(a.allowed for a in admissions)
    assert 40 <= allowed <= 41  # the burst, plus at most one unit refilled meanwhile
    assert allowed <= await granted(quota_server, "forty") - before
    assert all(a.retry_after_s > 0 for a in admissions if not a.allowed)
    assert calls(quota) <= 6


async def test_a_slow_tenant_gets_its_burst_and_no_more(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    shared = leases(quota, ManualClock(1000.0))
    admissions = [await request(shared, "trio") for _ in range(5)]
    assert [a.allowed for a in admissions] == [True, True, True, False, False]
    # One token per lease at 1 request/s: a call per request until the bucket is empty;
    # the third grant said so (remaining 0, next unit in about a second), so the requests
    # after it are refused by that bound, without a call (gateway/quota.py).
    assert [a.source for a in admissions] == ["call", "call", "call", "denial", "denial"]
    assert calls(quota) == 3


async def test_a_denial_is_answered_locally_until_its_retry_after(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    clock = ManualClock(1000.0)
    # Another gateway empties the bucket; this one learns it from the service's denial.
    other = leases(quota, clock)
    for _ in range(3):
        assert (await request(other, "trio")).allowed
    shared = leases(quota, clock)
    denied = await request(shared, "trio")
    assert (denied.allowed, denied.source) == (False, "call")
    assert calls(quota) == 4

    clock.now += denied.retry_after_s / 2
    remembered = await request(shared, "trio")
    assert (remembered.allowed, remembered.source) == (False, "denial")
    assert remembered.retry_after_s == pytest.approx(denied.retry_after_s / 2)
    assert calls(quota) == 4

    clock.now += denied.retry_after_s / 2
    after = await request(shared, "trio")
    assert after.source == "call"
    assert calls(quota) == 5


async def test_an_expired_lease_is_not_used(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    clock = ManualClock(1000.0)
    shared = leases(quota, clock, lease_ttl_s=0.1, refresh_ahead_s=0.0)
    # The first call leases 1 token, the second 2 (one used, one kept).
    assert [(await request(shared, "bulk")).source for _ in range(2)] == ["call", "call"]
    clock.now += 0.09
    assert (await request(shared, "bulk")).source == "lease"
    # Two tokens taken in 0.09 s: the pace of 3 per lease, plus this request: leases 4.
    assert (await request(shared, "bulk")).source == "call"
    clock.now += 0.1
    assert (await request(shared, "bulk")).source == "call"
    assert calls(quota) == 4


async def test_lease_max_1_makes_one_call_per_request(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    shared = leases(quota, ManualClock(1000.0), lease_max=1)
    admissions = await asyncio.gather(*(request(shared, "bulk") for _ in range(5)))
    admissions += [await request(shared, "bulk") for _ in range(5)]
    assert all(a.allowed and a.source == "call" for a in admissions)
    assert calls(quota) == 10


async def test_a_failing_quota_service_fails_every_waiting_request() -> None:
    down = Downstream.open(
        "quota-down", f"127.0.0.1:{free_port()}", quota_pb2_grpc.QuotaServiceStub
    )
    shared = leases(down, ManualClock(1000.0))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await request(shared, "bulk")
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        outcomes = await asyncio.gather(
            *(request(shared, "bulk") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes
    finally:
        await down.close()


class _LaggingClock(ManualClock):
    """Every reading is 0.2 s after the one before: a loop so overloaded that a lease of
    0.1 s has always expired by the time a request that waited for it runs again."""

    def __call__(self) -> float:
        self.advance(0.2)
        return self.now


async def test_requests_that_waited_for_a_grant_use_it_even_after_its_lease_expired(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    admit = leases(quota, _LaggingClock(1000.0))
    first = await request(admit, "bulk")  # learns the tenant's rate: leases grow from here
    assert first.allowed
    before = calls(quota)
    admissions = await asyncio.wait_for(
        asyncio.gather(*(request(admit, "bulk") for _ in range(10))), timeout=10
    )
    assert all(a.allowed for a in admissions)
    # One refill serves the ten waiting requests; without using the expired grant, each
    # waiter would lease again and again, throwing the tokens away.
    assert calls(quota) - before <= 2


async def test_a_steady_tenant_is_refilled_ahead_and_never_waits_for_a_call(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    clock = ManualClock(1000.0)
    shared = leases(quota, clock)
    # The first request learns the tenant's rate; the next ten share one call.
    assert (await request(shared, "bulk")).source == "call"
    await asyncio.gather(*(request(shared, "bulk") for _ in range(10)))
    made = calls(quota)
    sources = []
    # Then one request every 10 ms for half a second: five lease lifetimes. The requests
    # are 20 ms apart in real time, so a refill ahead (started 30 ms, three requests, before
    # the lease runs out) has 60 ms to come back.
    for _ in range(50):
        clock.now += 0.01
        sources.append((await request(shared, "bulk")).source)
        await asyncio.sleep(0.02)
    assert sources.count("lease") >= 49, sources  # one slow call on a loaded machine at most
    # A refill ahead per lease lifetime or so, not one per request.
    assert 3 <= calls(quota) - made <= 12


async def test_without_refilling_ahead_a_steady_tenant_waits_at_every_expiry(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    clock = ManualClock(1000.0)
    shared = leases(quota, clock, refresh_ahead_s=0.0)
    await request(shared, "bulk")
    await asyncio.gather(*(request(shared, "bulk") for _ in range(10)))
    sources = []
    for _ in range(50):
        clock.now += 0.01
        sources.append((await request(shared, "bulk")).source)
        await asyncio.sleep(0.02)
    assert sources.count("call") >= 4  # a lease of 0.1 s expires five times


async def test_a_refill_ahead_that_fails_costs_no_request_while_the_lease_lasts(
    redis_url: str, tmp_path: Path
) -> None:
    await reset_quota(redis_url, "bulk")
    tenants = registry(tmp_path / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=tenants)
    )
    clock = ManualClock(1000.0)
    async with serving(server):
        down = Downstream.open(
            f"quota-{uuid.uuid4().hex[:8]}",
            f"127.0.0.1:{server.port}",
            quota_pb2_grpc.QuotaServiceStub,
        )
        shared = leases(down, clock)
        await request(shared, "bulk")
        await asyncio.gather(*(request(shared, "bulk") for _ in range(10)))
        # Eleven tokens in 10 ms: the last one's refill ahead leases the most, 32.
        clock.now += 0.01
        assert (await request(shared, "bulk")).source == "lease"
        await asyncio.sleep(0.2)
    try:
        # The quota service is gone: the lease's 32 tokens still admit requests, each
        # starting a refill ahead that fails; once they run out, requests fail.
        outcomes: list[str] = []
        for _ in range(40):
            clock.now += 0.001
            try:
                outcomes.append((await request(shared, "bulk")).source)
            except CALL_FAILURES:
                outcomes.append("failed")
            await asyncio.sleep(0.005)
        assert outcomes == ["lease"] * 32 + ["failed"] * 8
    finally:
        await down.close()


async def test_tokens_leased_still_admit_after_a_refill_ahead_is_denied(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    clock = ManualClock(1000.0)
    shared = leases(quota, clock, lease_ttl_s=100.0)
    assert (await request(shared, "forty")).source == "call"  # learns the rate: 1/s
    await asyncio.gather(*(request(shared, "forty") for _ in range(10)))  # leases 11
    clock.now += 1.0
    before = calls(quota)
    # The lease's last token: its refill ahead leases what the bucket has left (28 of 40).
    assert (await request(shared, "forty")).source == "lease"
    for _ in range(500):
        if calls(quota) > before:
            break
        await asyncio.sleep(0.01)
    # The bucket is empty, so the next refill ahead is denied; the tokens the gateway
    # holds were counted by the bucket when it granted them, and keep admitting.
    admissions = []
    for _ in range(20):
        admissions.append(await request(shared, "forty"))
        await asyncio.sleep(0.005)
    assert [a.source for a in admissions if a.allowed] == ["lease"] * 20
    # The refill and the denied one; none while the denial is in force (a unit refilled in
    # real time meanwhile may add one granted refill before the denial).
    assert 2 <= calls(quota) - before <= 3
