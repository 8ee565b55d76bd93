"""A tenant far over its quota is refused by the gateway without a call: the bound its last
denial puts on the bucket (gateway.quota), against a real quota service and Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from gateway.quota import Admission, QuotaLeases
from mesh.client import CallPolicy, Downstream
from mesh.context import tenant_var
from mesh.server import MeshServer
from mesh.testing import ManualClock, built_server, serving
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import reset_quota

RATE = 10.0
"""The tenant's quota, requests/s (burst 1): the gateway makes one call per request."""


@pytest.fixture(scope="module")
async def quota_server(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MeshServer]:
    path = tmp_path_factory.mktemp("bound") / "tenants.json"
    digest = hashlib.sha256(b"ten-key").hexdigest()
    path.write_text(
        json.dumps({"tenants": {"ten": {"api_key_sha256": digest, "rate": RATE, "burst": 1}}})
    )
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=path)
    )
    async with serving(server):
        yield server


@pytest.fixture
async def quota(
    quota_server: MeshServer, redis_url: str
) -> AsyncIterator[Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]]:
    await reset_quota(redis_url, "ten")
    downstream = Downstream.open(
        f"quota-{uuid.uuid4().hex[:8]}",
        f"127.0.0.1:{quota_server.port}",
        quota_pb2_grpc.QuotaServiceStub,
    )
    yield downstream
    await downstream.close()


def calls(downstream: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]) -> int:
    labels = {"downstream": downstream.name, "code": "OK"}
    return int(REGISTRY.get_sample_value("recmesh_downstream_attempts_total", labels) or 0)


async def admit(quota: QuotaLeases) -> Admission:
    async def one() -> Admission:
        tenant_var.set("ten")
        return await quota.acquire("ten")

    return await asyncio.create_task(one())


async def test_a_tenant_at_ten_times_its_rate_makes_about_rate_calls(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    leases = QuotaLeases(quota, lease_max=1, lease_ttl_s=0.1, refresh_ahead_s=0.03, cap_s=2.0)
    started = time.monotonic()
    admissions = []
    while time.monotonic() - started < 1.5:
        admissions.append(await admit(leases))
        await asyncio.sleep(1 / (10 * RATE))
    elapsed = time.monotonic() - started
    allowed = sum(a.allowed for a in admissions)
    sources = Counter(a.source for a in admissions if not a.allowed)
    # The burst and what the rate refilled, give or take the loop's timing.
    assert RATE * elapsed - 2 <= allowed <= 1 + RATE * elapsed + 1
    # Nearly every call is a grant; the refusals are the gateway's own.
    assert calls(quota) <= allowed + 3
    assert sources["call"] <= 3 and sources["denial"] >= len(admissions) - allowed - 3
    assert all(a.retry_after_s > 0 for a in admissions if not a.allowed)


async def test_requests_during_the_call_that_takes_the_next_unit_are_refused_locally(
    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub],
) -> None:
    leases = QuotaLeases(quota, lease_max=1, lease_ttl_s=0.1, refresh_ahead_s=0.03, cap_s=2.0)
    assert (await admit(leases)).allowed  # the burst; the answer says the bucket is empty
    denied = await admit(leases)
    assert (denied.allowed, denied.source) == (False, "denial")
    assert 0 < denied.retry_after_s <= 1 / RATE
    await asyncio.sleep(denied.retry_after_s + 0.01)  # one unit back in the bucket
    before = calls(quota)
    together = await asyncio.gather(*(admit(leases) for _ in range(5)))
    assert sum(a.allowed for a in together) == 1
    assert calls(quota) - before == 1  # the one call that took the unit
    assert sorted(a.source for a in together if not a.allowed) == ["denial"] * 4
    # And the funnel's check before any other work says the same.
    assert leases.denied("ten") is not None


class FailingQuota:
    """Answers one Acquire as a bucket of ``RATE``/s just emptied would, then fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def Acquire(
        self,
        request: quota_pb2.AcquireRequest,
        timeout: float | None = None,  # noqa: ASYNC109 (a stub's signature, as gRPC's)
    ) -> quota_pb2.AcquireResponse:
        self.calls += 1
        if self.calls > 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        return quota_pb2.AcquireResponse(
            allowed=True, rate=RATE, burst=1, remaining=0, granted=1, next_unit_s=1 / RATE
        )


async def test_while_the_quota_service_is_down_the_bound_keeps_a_tenant_to_its_rate() -> None:
    clock = ManualClock(1000.0)
    stub = FailingQuota()
    down: Downstream[Any] = Downstream("quota-failing", stub, policy=CallPolicy(max_attempts=1))
    leases = QuotaLeases(
        down, lease_max=1, lease_ttl_s=0.1, refresh_ahead_s=0.03, cap_s=2.0, clock=clock
    )
    assert (await admit(leases)).allowed
    # Within the next unit's time: refused by the bound, no call.
    assert (await admit(leases)).source == "denial"
    clock.advance(1 / RATE)
    # A unit may be back: the call fails (the funnel fails open and serves it) ...
    with pytest.raises(grpc.aio.AioRpcError):
        await admit(leases)
    # ... and counts as having taken it: the next requests wait for the unit after.
    assert [(await admit(leases)).source for _ in range(3)] == ["denial"] * 3
    assert stub.calls == 2
    clock.advance(1 / RATE)
    with pytest.raises(grpc.aio.AioRpcError):
        await admit(leases)
    assert stub.calls == 3
