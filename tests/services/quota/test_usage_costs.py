"""RecordUsage and the costs in GetUsage, against a real Redis, in-process on port 0."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.testing import built_server, channel_to, serving
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import write_tenants


@pytest.fixture(scope="module")
async def quota(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[quota_pb2_grpc.QuotaServiceAsyncStub]:
    tenants = write_tenants(tmp_path_factory.mktemp("usage") / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=tenants)
    )
    async with serving(server), channel_to(server) as channel:
        yield quota_pb2_grpc.QuotaServiceStub(channel)


async def usage_of(
    stub: quota_pb2_grpc.QuotaServiceAsyncStub, tenant: str
) -> quota_pb2.TenantUsage:
    reply = await stub.GetUsage(quota_pb2.GetUsageRequest(tenant=tenant))
    return reply.usage[0]


def cost(tenant: str, requests: int, retrieval_us: int, ranking_us: int) -> quota_pb2.TenantCost:
    return quota_pb2.TenantCost(
        tenant=tenant,
        requests=requests,
        cpu_us={"retrieval": retrieval_us, "ranking": ranking_us},
        candidates_scored={"prerank": 10 * requests, "heavy": 4 * requests},
    )


async def test_a_batch_is_added_once_per_tenant_however_often_it_is_sent(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub,
) -> None:
    before = {t: await usage_of(quota, t) for t in ("demo", "acme", "tiny")}
    batch = quota_pb2.RecordUsageRequest(
        batch_id=uuid.uuid4().hex,
        costs=[cost("demo", 3, 4500, 9000), cost("acme", 1, 1000, 2500)],
    )
    assert (await quota.RecordUsage(batch)).added == 2
    assert (await quota.RecordUsage(batch)).added == 0  # a retry of the same batch
    demo, acme, tiny = [await usage_of(quota, t) for t in ("demo", "acme", "tiny")]
    assert demo.costed_requests - before["demo"].costed_requests == 3
    assert demo.retrieval_cpu_ms - before["demo"].retrieval_cpu_ms == pytest.approx(4.5)
    assert demo.ranking_cpu_ms - before["demo"].ranking_cpu_ms == pytest.approx(9.0)
    assert demo.candidates_scored - before["demo"].candidates_scored == 42
    assert (
        demo.candidates_scored_by_stage["prerank"]
        - before["demo"].candidates_scored_by_stage.get("prerank", 0)
        == 30
    )
    assert acme.costed_requests - before["acme"].costed_requests == 1
    assert acme.ranking_cpu_ms - before["acme"].ranking_cpu_ms == pytest.approx(2.5)
    assert tiny == before["tiny"]  # named in no batch: unchanged
    # Admissions are counted as before, beside the costs.
    assert demo.allowed == before["demo"].allowed


async def test_a_new_batch_adds_again_and_unknown_tenants_are_left_out(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub,
) -> None:
    before = await usage_of(quota, "demo")
    for _ in range(2):
        reply = await quota.RecordUsage(
            quota_pb2.RecordUsageRequest(
                batch_id=uuid.uuid4().hex, costs=[cost("demo", 1, 100, 200), cost("gone", 5, 1, 1)]
            )
        )
        assert reply.added == 1
    after = await usage_of(quota, "demo")
    assert after.costed_requests - before.costed_requests == 2
    assert after.retrieval_cpu_ms - before.retrieval_cpu_ms == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (quota_pb2.RecordUsageRequest(batch_id=""), "batch_id"),
        (quota_pb2.RecordUsageRequest(batch_id="a b"), "batch_id"),
        (
            quota_pb2.RecordUsageRequest(batch_id="x", costs=[cost("demo", 1, 1, 1)] * 2),
            "costs.tenant",
        ),
        (
            quota_pb2.RecordUsageRequest(
                batch_id="x", costs=[quota_pb2.TenantCost(tenant="demo", requests=-1)]
            ),
            "costs.requests",
        ),
        (
            quota_pb2.RecordUsageRequest(
                batch_id="x", costs=[quota_pb2.TenantCost(tenant="demo", cpu_us={"Bad:Key": 1})]
            ),
            "costs.cpu_us",
        ),
        (
            quota_pb2.RecordUsageRequest(
                batch_id="x",
                costs=[quota_pb2.TenantCost(tenant="demo", candidates_scored={"heavy": -2})],
            ),
            "costs.candidates_scored",
        ),
    ],
)
async def test_malformed_batches_are_refused_whole(
    quota: quota_pb2_grpc.QuotaServiceAsyncStub,
    request_: quota_pb2.RecordUsageRequest,
    field: str,
) -> None:
    before = await usage_of(quota, "demo")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await quota.RecordUsage(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(refused.value.trailing_metadata() or ())["x-recmesh-field"] == field
    assert await usage_of(quota, "demo") == before
