"""Variable grants of the quota limiter and service (``max_cost``), against a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from mesh.testing import built_server, channel_to, serving
from services.quota.limiter import RedisRateLimiter
from services.quota.server import build_service as build_quota
from services.quota.servicer import MAX_COST
from services.quota.settings import QuotaSettings
from tests.inprocess import reset_quota, write_tenants

SLOW = 0.5
"""Refill rate (units/s) slow enough that no unit comes back during a test."""


@pytest.fixture(scope="module")
async def limiter(redis_url: str) -> AsyncIterator[RedisRateLimiter]:
    client: AsyncRedis = mesh_redis.connect(redis_url)
    yield RedisRateLimiter(client)
    await client.aclose()


@pytest.fixture(scope="module")
async def quota(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[quota_pb2_grpc.QuotaServiceAsyncStub]:
    tenants = write_tenants(tmp_path_factory.mktemp("quota-leases") / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=tenants)
    )
    async with serving(server), channel_to(server) as channel:
        yield quota_pb2_grpc.QuotaServiceStub(channel)


def bucket() -> str:
    return f"test:{uuid.uuid4().hex}"


async def test_a_lease_takes_what_the_bucket_has_up_to_max_cost(
    limiter: RedisRateLimiter,
) -> None:
    name = bucket()
    first = await limiter.acquire(name, SLOW, 5, cost=1, max_cost=3)
    second = await limiter.acquire(name, SLOW, 5, cost=1, max_cost=3)
    third = await limiter.acquire(name, SLOW, 5, cost=1, max_cost=3)
    assert (first.allowed, first.granted, first.remaining) == (True, 3, 2)
    assert (second.allowed, second.granted, second.remaining) == (True, 2, 0)
    assert (third.allowed, third.granted, third.remaining) == (False, 0, 0)
    assert 0 < third.retry_after_s <= 1 / SLOW


async def test_a_lease_is_denied_when_fewer_than_cost_are_left(
    limiter: RedisRateLimiter,
) -> None:
    name = bucket()
    assert (await limiter.acquire(name, SLOW, 5, cost=4)).granted == 4
    denied = await limiter.acquire(name, SLOW, 5, cost=2, max_cost=5)
    assert (denied.allowed, denied.granted, denied.remaining) == (False, 0, 1)
    # The denial took nothing: the last unit is still there.
    last = await limiter.acquire(name, SLOW, 5, cost=1, max_cost=5)
    assert (last.allowed, last.granted, last.remaining) == (True, 1, 0)


async def test_usage_counts_units_granted_and_calls_denied(limiter: RedisRateLimiter) -> None:
    name = bucket()
    await limiter.acquire(name, SLOW, 10, cost=1, max_cost=4)
    await limiter.acquire(name, SLOW, 10, cost=2)
    await limiter.acquire(name, SLOW, 10, cost=1, max_cost=10)
    await limiter.acquire(name, SLOW, 10, cost=1, max_cost=10)
    usage = await limiter.usage(name)
    assert (usage.allowed, usage.rejected) == (10, 1)


async def test_without_max_cost_a_call_takes_exactly_cost(limiter: RedisRateLimiter) -> None:
    name = bucket()
    decisions = [await limiter.acquire(name, SLOW, 5, cost=2) for _ in range(3)]
    assert [(d.allowed, d.granted, d.remaining) for d in decisions] == [
        (True, 2, 3),
        (True, 2, 1),
        (False, 0, 1),
    ]


async def test_old_clients_get_exactly_cost_from_the_service(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    reply = await quota.Acquire(quota_pb2.AcquireRequest(tenant="tiny"))
    assert (reply.allowed, reply.granted, reply.remaining) == (True, 1, 1)


async def test_the_service_leases_and_reports_the_grant(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    lease = await quota.Acquire(quota_pb2.AcquireRequest(tenant="tiny", cost=1, max_cost=5))
    assert (lease.allowed, lease.granted, lease.remaining) == (True, 2, 0)
    denied = await quota.Acquire(quota_pb2.AcquireRequest(tenant="tiny", cost=1, max_cost=5))
    assert (denied.allowed, denied.granted) == (False, 0)
    assert denied.retry_after_s > 0


@pytest.mark.parametrize(
    ("cost", "max_cost"), [(0, -1), (3, 2), (1, MAX_COST + 1), (0, MAX_COST + 1)]
)
async def test_the_service_rejects_a_max_cost_out_of_range(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, cost: int, max_cost: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await quota.Acquire(quota_pb2.AcquireRequest(tenant="demo", cost=cost, max_cost=max_cost))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", "max_cost") in tuple(error.value.trailing_metadata() or ())


async def test_the_service_accepts_max_cost_equal_to_cost(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, redis_url: str
) -> None:
    await reset_quota(redis_url, "demo")
    reply = await quota.Acquire(quota_pb2.AcquireRequest(tenant="demo", cost=3, max_cost=3))
    assert (reply.allowed, reply.granted) == (True, 3)


async def test_a_check_answers_like_a_take_but_takes_nothing(limiter: RedisRateLimiter) -> None:
    name = bucket()
    assert (await limiter.acquire(name, SLOW, 5, cost=4)).granted == 4
    enough = await limiter.check(name, SLOW, 5, cost=1)
    short = await limiter.check(name, SLOW, 5, cost=2)
    assert (enough.allowed, enough.granted, enough.remaining, enough.retry_after_s) == (
        True,
        0,
        1,
        0.0,
    )
    assert (short.allowed, short.granted, short.remaining) == (False, 0, 1)
    assert 0 < short.retry_after_s <= 1 / SLOW
    # Neither check took the last unit nor was counted.
    usage = await limiter.usage(name)
    assert (usage.allowed, usage.rejected) == (4, 0)
    last = await limiter.acquire(name, SLOW, 5, cost=1)
    assert (last.allowed, last.granted, last.remaining) == (True, 1, 0)


async def test_refill_s_is_the_time_until_the_bucket_is_full(limiter: RedisRateLimiter) -> None:
    name = bucket()
    assert (await limiter.check(name, SLOW, 5, cost=0)).refill_s == 0.0
    taken = await limiter.acquire(name, SLOW, 5, cost=3)
    assert taken.refill_s == pytest.approx(3 / SLOW, abs=0.1)
    # Two units are left: four are there again once two come back, 4 s at 0.5/s.
    assert taken.seconds_until(4, SLOW, 5) == pytest.approx(2 / SLOW, abs=0.1)
    assert taken.seconds_until(2, SLOW, 5) == 0.0


async def test_the_service_checks_without_consuming(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    before = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="tiny"))).usage[0]
    checks = [
        await quota.Acquire(quota_pb2.AcquireRequest(tenant="tiny", check_only=True))
        for _ in range(3)
    ]
    assert [(c.allowed, c.granted, c.remaining) for c in checks] == [(True, 0, 2)] * 3
    too_many = await quota.Acquire(quota_pb2.AcquireRequest(tenant="tiny", cost=3, check_only=True))
    assert (too_many.allowed, too_many.granted, too_many.remaining) == (False, 0, 2)
    assert too_many.retry_after_s > 0
    after = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="tiny"))).usage[0]
    assert (after.allowed, after.rejected) == (before.allowed, before.rejected)
    # The bucket is still full: a take gets the first of its two units.
    taken = await quota.Acquire(quota_pb2.AcquireRequest(tenant="tiny"))
    assert (taken.allowed, taken.granted, taken.remaining) == (True, 1, 1)


async def test_the_service_refuses_a_lease_with_check_only(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await quota.Acquire(
            quota_pb2.AcquireRequest(tenant="demo", cost=1, max_cost=5, check_only=True)
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", "max_cost") in tuple(error.value.trailing_metadata() or ())
