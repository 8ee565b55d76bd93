"""The feature service reads the projector's item counters and trending set, decayed to the
time of the read: against a real Valkey, with events applied by the projector's own code."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import pytest
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core import keys
from core.replay import decayed, tau_ms
from mesh import redis as mesh_redis
from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.feature.server import build_service
from services.feature.settings import FeatureSettings
from tests.projected import HALF_LIFE_S, HOUR_MS, event, now_ms, project

if TYPE_CHECKING:
    FeatureStub = feature_pb2_grpc.FeatureServiceAsyncStub


@pytest.fixture(scope="module")
async def server(redis_url: str, artifacts_root: Path) -> AsyncIterator[MeshServer]:
    settings = FeatureSettings(
        port=0, redis_url=redis_url, artifacts=artifacts_root, half_life_s=HALF_LIFE_S
    )
    async with serving(await built_server(build_service, settings)) as running:
        yield running


@pytest.fixture(scope="module")
async def stub(server: MeshServer) -> AsyncIterator[FeatureStub]:
    async with channel_to(server) as channel:
        yield feature_pb2_grpc.FeatureServiceStub(channel)


async def fresh_tenant(stub: FeatureStub) -> str:
    tenant = "ct" + uuid.uuid4().hex[:10]
    await stub.Materialize(feature_pb2.MaterializeRequest(), metadata=tenant_metadata(tenant))
    return tenant


async def test_counters_come_with_the_rows_decayed_to_the_read(
    stub: FeatureStub, redis_url: str
) -> None:
    tenant = await fresh_tenant(stub)
    now = now_ms()
    await project(
        redis_url,
        tenant,
        [
            *(event("impression", f"u{n}", 7, now - 2 * HOUR_MS) for n in range(6)),
            event("click", "u1", 7, now - HOUR_MS),
            event("conversion", "u1", 7, now - HOUR_MS),
            event("impression", "u2", 9, now),
        ],
    )
    reply = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(item_ids=[3], counter_item_ids=[7, 9, 11]),
        metadata=tenant_metadata(tenant),
    )
    assert reply.features.rows == 1  # the rows asked for, apart from the counters
    counters = reply.counters
    stored = await _stored(redis_url, tenant, 7)
    tau = tau_ms(HALF_LIFE_S)
    at = counters.as_of_ms
    assert abs(at - now_ms()) < 5_000
    for kind, got in (
        ("impression", counters.impressions[0]),
        ("click", counters.clicks[0]),
        ("conversion", counters.conversions[0]),
    ):
        value, when = stored[kind]
        assert got == pytest.approx(decayed(value, when, at, tau), rel=1e-9)
    assert counters.impressions[0] == pytest.approx(6 * 0.25, rel=1e-3)  # two half-lives
    assert counters.clicks[0] == pytest.approx(0.5, rel=1e-3)
    assert counters.impressions[1] == pytest.approx(1.0, rel=1e-3)
    assert (counters.clicks[1], counters.impressions[2], counters.clicks[2]) == (0, 0, 0)


async def test_without_counter_ids_no_counters_are_read(stub: FeatureStub) -> None:
    tenant = await fresh_tenant(stub)
    reply = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(item_ids=[1, 2]), metadata=tenant_metadata(tenant)
    )
    assert not reply.HasField("counters")
    only = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(counter_item_ids=[1, 2]),
        metadata=tenant_metadata(tenant),
    )
    assert only.features.rows == 0 and list(only.counters.clicks) == [0.0, 0.0]


async def test_trending_items_most_decayed_clicks_first(stub: FeatureStub, redis_url: str) -> None:
    tenant = await fresh_tenant(stub)
    now = now_ms()
    await project(
        redis_url,
        tenant,
        [
            # Item 5: four clicks three hours ago, 0.5 left now; item 8: one click now;
            # item 4: one click ten hours ago, 0.001 left.
            *(event("click", f"u{n}", 5, now - 3 * HOUR_MS) for n in range(4)),
            event("click", "u9", 8, now),
            event("click", "u9", 4, now - 10 * HOUR_MS),
            event("impression", "u9", 6, now),  # impressions alone never trend
        ],
    )
    reply = await stub.GetTrendingItems(
        feature_pb2.GetTrendingItemsRequest(k=10), metadata=tenant_metadata(tenant)
    )
    assert list(reply.item_ids) == [8, 5, 4]
    assert list(reply.clicks) == pytest.approx([1.0, 0.5, 2**-10], rel=1e-3)
    floor = await stub.GetTrendingItems(
        feature_pb2.GetTrendingItemsRequest(k=10, min_clicks=0.1), metadata=tenant_metadata(tenant)
    )
    assert list(floor.item_ids) == [8, 5]
    top = await stub.GetTrendingItems(
        feature_pb2.GetTrendingItemsRequest(k=1), metadata=tenant_metadata(tenant)
    )
    assert list(top.item_ids) == [8]
    nothing = await stub.GetTrendingItems(
        feature_pb2.GetTrendingItemsRequest(k=10), metadata=tenant_metadata("nobody" + tenant)
    )
    assert list(nothing.item_ids) == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (feature_pb2.GetTrendingItemsRequest(k=0), "k"),
        (feature_pb2.GetTrendingItemsRequest(k=10**6), "k"),
        (feature_pb2.GetTrendingItemsRequest(k=5, min_clicks=-1), "min_clicks"),
        (feature_pb2.GetTrendingItemsRequest(k=5, min_clicks=math.inf), "min_clicks"),
    ],
)
async def test_trending_arguments_are_checked(
    stub: FeatureStub, request_: feature_pb2.GetTrendingItemsRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetTrendingItems(request_, metadata=tenant_metadata("demo"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(raised.value.trailing_metadata() or ())
    assert trailing.get("x-recmesh-field") == field


async def _stored(redis_url: str, tenant: str, item: int) -> dict[str, tuple[float, int]]:
    client = mesh_redis.client(redis_url)
    try:
        raw = cast(dict[bytes, bytes], await client.hgetall(keys.item_counters(tenant, item)))
    finally:
        await client.aclose()
    fields = {k.decode(): v for k, v in raw.items()}
    return {
        kind: (float(fields[kind]), int(fields[f"{kind}_at"]))
        for kind in ("impression", "click", "conversion")
    }
