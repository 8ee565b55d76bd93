"""The quota service (RecMesh API and Envoy RLS) against a real Redis, in-process on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.testing import built_server, channel_to, serving
from services.quota.envoy import window_limit
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import reset_quota, write_tenants

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit


@pytest.fixture(scope="module")
async def quota_channel(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[grpc.aio.Channel]:
    tenants = write_tenants(tmp_path_factory.mktemp("quota") / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=tenants)
    )
    async with serving(server), channel_to(server) as channel:
        yield channel


async def test_quota_allows_the_burst_then_rejects_with_retry_after(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    stub = quota_pb2_grpc.QuotaServiceStub(quota_channel)
    decisions = [await stub.Acquire(quota_pb2.AcquireRequest(tenant="tiny")) for _ in range(4)]
    allowed = [d.allowed for d in decisions]
    assert allowed[:2] == [True, True] and not any(allowed[2:])
    assert 0 < decisions[-1].retry_after_s <= 2.0
    usage = await stub.GetUsage(quota_pb2.GetUsageRequest(tenant="tiny"))
    assert usage.usage[0].rejected >= 2


async def test_envoy_rls_shares_the_tenant_bucket(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value="tiny")]
    )
    request = rls_pb2.RateLimitRequest(domain="recmesh", descriptors=[descriptor])
    codes = [(await rls.ShouldRateLimit(request)).overall_code for _ in range(3)]
    assert codes == [
        rls_pb2.RateLimitResponse.OK,
        rls_pb2.RateLimitResponse.OK,
        rls_pb2.RateLimitResponse.OVER_LIMIT,
    ]
    unconfigured = rls_pb2.RateLimitRequest(
        domain="recmesh",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="path", value="/x")]
            )
        ],
    )
    assert (await rls.ShouldRateLimit(unconfigured)).overall_code == rls_pb2.RateLimitResponse.OK


async def test_unknown_tenant_quota_is_not_found(quota_channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await quota_pb2_grpc.QuotaServiceStub(quota_channel).Acquire(
            quota_pb2.AcquireRequest(tenant="ghost")
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


# Envoy's reference rate-limit service (envoyproxy/ratelimit) answer by answer; the mapping
# of its fixed windows onto the bucket is in docs/architecture.md ("Envoy's rate-limit API").
# Tenants (tests/inprocess.py): tiny is 0.5/s with a burst of 2, so 30 per MINUTE, and one
# unit comes back every 2 s; demo is 1000/s with a burst of 2000, so 1000 per SECOND.


def tenant_descriptor(tenant: str, hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    """A descriptor naming ``tenant``; ``hits`` sets its own ``hits_addend`` (0 included)."""
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value=tenant)]
    )
    if hits is not None:
        descriptor.hits_addend.value = hits
    return descriptor


async def status_of(
    rls: rls_pb2_grpc.RateLimitServiceAsyncStub,
    tenant: str,
    hits: int | None = None,
    request_hits: int = 0,
) -> rls_pb2.RateLimitResponse.DescriptorStatus:
    """The one status of a ``recmesh`` request for ``tenant``; checks it matches overall."""
    response = await rls.ShouldRateLimit(
        rls_pb2.RateLimitRequest(
            domain="recmesh",
            descriptors=[tenant_descriptor(tenant, hits)],
            hits_addend=request_hits,
        )
    )
    assert len(response.statuses) == 1
    assert response.overall_code == response.statuses[0].code
    return response.statuses[0]


def summary(status: rls_pb2.RateLimitResponse.DescriptorStatus) -> tuple[int, int, int]:
    """(code, limit_remaining, whole seconds until reset) of a status with a limit."""
    assert status.HasField("current_limit") and status.HasField("duration_until_reset")
    assert status.duration_until_reset.nanos == 0
    return (status.code, status.limit_remaining, status.duration_until_reset.seconds)


async def test_an_explicit_hits_addend_of_zero_checks_without_consuming(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    quota = quota_pb2_grpc.QuotaServiceStub(quota_channel)
    before = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="tiny"))).usage[0]
    checks = [summary(await status_of(rls, "tiny", hits=0)) for _ in range(3)]
    assert checks == [(OK, 2, 1)] * 3
    # The request's hits_addend does not apply when the descriptor sets its own 0.
    assert summary(await status_of(rls, "tiny", hits=0, request_hits=5)) == (OK, 2, 1)
    after = (await quota.GetUsage(quota_pb2.GetUsageRequest(tenant="tiny"))).usage[0]
    assert (after.allowed, after.rejected) == (before.allowed, before.rejected)
    # Both units are still there; once they are spent a check is OK with nothing left
    # (the reference: count + 0 is not over the limit) and still takes nothing.
    assert summary(await status_of(rls, "tiny"))[:2] == (OK, 1)
    assert summary(await status_of(rls, "tiny"))[:2] == (OK, 0)
    assert summary(await status_of(rls, "tiny", hits=0))[:2] == (OK, 0)
    assert summary(await status_of(rls, "tiny"))[:2] == (OVER_LIMIT, 0)


async def test_ok_answers_carry_the_time_until_the_limit_is_back(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    # Each unit taken is back 2 s later: the bucket is full again 2 s, then 4 s, from now.
    answers = [summary(await status_of(rls, "tiny")) for _ in range(3)]
    assert answers == [(OK, 1, 2), (OK, 0, 4), (OVER_LIMIT, 0, 4)]
    await reset_quota(redis_url, "demo")
    # 1000 per SECOND: like the reference's per-second limits, 1 s on every answer.
    assert summary(await status_of(rls, "demo")) == (OK, 1000, 1)


async def test_limit_remaining_never_exceeds_requests_per_unit(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "demo")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    # demo's bucket holds 2000, but its limit is 1000 per SECOND.
    first = await status_of(rls, "demo", hits=5)
    assert (first.current_limit.requests_per_unit, first.current_limit.unit) == (
        1000,
        Unit.SECOND,
    )
    assert first.current_limit.name == "tenant:demo"
    assert (first.code, first.limit_remaining) == (OK, 1000)
    check = await status_of(rls, "demo", hits=0)
    assert (check.code, check.limit_remaining) == (OK, 1000)
    # Below the cap the figure is the bucket's: 2000 - 5 - 1200 = 795 left, plus what
    # came back (1 unit a millisecond) since the first hit.
    big = await status_of(rls, "demo", hits=1200)
    assert big.code == OK and 795 <= big.limit_remaining < 1000


async def test_a_hit_larger_than_the_limit_is_over_limit_with_the_usual_reset(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    # The reference's reset depends on the limit's unit and the clock, never on the hit's
    # size: here the bucket is full, so its allowance is back at once (reported as 1 s).
    assert summary(await status_of(rls, "tiny", hits=10_000)) == (OVER_LIMIT, 0, 1)
    assert summary(await status_of(rls, "tiny", request_hits=10_000)) == (OVER_LIMIT, 0, 1)
    # After one unit is taken the bucket is full again in 2 s, whatever the hit's size.
    assert summary(await status_of(rls, "tiny")) == (OK, 1, 2)
    assert summary(await status_of(rls, "tiny", hits=2**40)) == (OVER_LIMIT, 0, 2)
    # The denied hits took nothing: the last unit is still there.
    assert summary(await status_of(rls, "tiny"))[:2] == (OK, 0)


async def test_an_unknown_domain_is_ok_without_a_limit(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    response = await rls.ShouldRateLimit(
        rls_pb2.RateLimitRequest(
            domain="other", descriptors=[tenant_descriptor("tiny"), tenant_descriptor("tiny", 9)]
        )
    )
    assert response.overall_code == OK
    assert [
        (s.code, s.HasField("current_limit"), s.limit_remaining) for s in response.statuses
    ] == [
        (OK, False, 0),
        (OK, False, 0),
    ]
    # Nothing was taken from the tenant's bucket.
    assert summary(await status_of(rls, "tiny", hits=0))[:2] == (OK, 2)


@pytest.mark.parametrize(
    ("refused", "field"),
    [
        (rls_pb2.RateLimitRequest(descriptors=[tenant_descriptor("tiny")]), "domain"),
        (rls_pb2.RateLimitRequest(domain="recmesh"), "descriptors"),
        (rls_pb2.RateLimitRequest(domain="other"), "descriptors"),
    ],
)
async def test_an_empty_domain_or_descriptor_list_is_refused(
    quota_channel: grpc.aio.Channel, refused: rls_pb2.RateLimitRequest, field: str
) -> None:
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rls.ShouldRateLimit(refused)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", field) in tuple(error.value.trailing_metadata() or ())


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (1000, (1000, Unit.SECOND, 1)),
        (0.5, (30, Unit.MINUTE, 60)),
        (2.5, (150, Unit.MINUTE, 60)),
        (1 / 7, (8, Unit.MINUTE, 60)),
        (1 / 3600, (1, Unit.HOUR, 3600)),
        (1e-6, (1, Unit.DAY, 86400)),
        (1e12, (2**32 - 1, Unit.SECOND, 1)),
    ],
)
def test_a_rate_is_whole_requests_in_the_smallest_unit(
    rate: float, expected: tuple[int, int, int]
) -> None:
    limit = window_limit(rate)
    assert (limit.requests_per_unit, limit.unit, limit.unit_s) == expected
