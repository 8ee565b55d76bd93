"""The quota service (RecMesh API and Envoy RLS) against a real Redis, in-process on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.testing import built_server, channel_to, serving
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import reset_quota, write_tenants


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
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="other"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_tenant_quota_is_not_found(quota_channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await quota_pb2_grpc.QuotaServiceStub(quota_channel).Acquire(
            quota_pb2.AcquireRequest(tenant="ghost")
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
