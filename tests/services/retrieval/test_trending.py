"""Retrieval's trending source against real feature and retrieval servers in-process, with
clicks applied by the projector's own code on the same Valkey."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from mesh.client import Downstream
from mesh.context import tenant_var
from mesh.faults import write_flags
from mesh.ports import free_port
from mesh.server import MeshServer
from mesh.testing import ManualClock, built_server, channel_to, serving, tenant_metadata
from services.retrieval.server import build_service as build_retrieval
from services.retrieval.settings import RetrievalSettings
from services.retrieval.trending import TrendingCache
from tests.projected import HOUR_MS, event, feature_service, now_ms, project

if TYPE_CHECKING:
    FeatureStub = feature_pb2_grpc.FeatureServiceAsyncStub
    RetrievalStub = retrieval_pb2_grpc.RetrievalServiceAsyncStub

NEWCOMER = "newcomer"
"""A user the artifact set does not have: no ANN candidates, so trending comes first."""


@pytest.fixture(scope="module")
async def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trending") / "faults.json"


@pytest.fixture(scope="module")
async def feature(redis_url: str, artifacts_root: Path, faults: Path) -> AsyncIterator[MeshServer]:
    async with feature_service(redis_url, artifacts_root, faults) as running:
        yield running


@pytest.fixture(scope="module")
async def features(feature: MeshServer) -> AsyncIterator[FeatureStub]:
    async with channel_to(feature) as channel:
        yield feature_pb2_grpc.FeatureServiceStub(channel)


@pytest.fixture
async def tenant(features: FeatureStub) -> str:
    """A tenant of its own per test: nothing clicked yet, no list cached anywhere."""
    name = "trd" + uuid.uuid4().hex[:10]
    await features.Materialize(feature_pb2.MaterializeRequest(), metadata=tenant_metadata(name))
    return name


@asynccontextmanager
async def retrieval_server(
    artifacts_root: Path, feature: MeshServer, faults: Path, redis_url: str
) -> AsyncIterator[RetrievalStub]:
    """A fresh retrieval server (an empty trending cache) reading users from ``redis_url``
    and refreshing its lists from ``feature``."""
    settings = RetrievalSettings(
        port=0,
        artifacts=artifacts_root,
        redis_url=redis_url,
        feature_addr=f"127.0.0.1:{feature.port}",
        feature_budget_s=0.5,
        faults_file=str(faults),
        drain_delay_s=0,
    )
    async with (
        serving(await built_server(build_retrieval, settings)) as server,
        channel_to(server) as channel,
    ):
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)


@pytest.fixture
async def retrieval(
    artifacts_root: Path, feature: MeshServer, faults: Path, redis_url: str
) -> AsyncIterator[RetrievalStub]:
    async with retrieval_server(artifacts_root, feature, faults, redis_url) as stub:
        yield stub


def set_faults(feature: MeshServer, path: Path, flags: dict[str, Any]) -> None:
    write_flags(path, flags)
    feature.faults.reload()


async def retrieve(
    stub: RetrievalStub, tenant: str, user: str, **fields: int
) -> retrieval_pb2.RetrieveResponse:
    reply: retrieval_pb2.RetrieveResponse = await stub.Retrieve(
        retrieval_pb2.RetrieveRequest(user_id=user, **fields),
        metadata=tenant_metadata(tenant),
        timeout=5,
    )
    return reply


def trending_of(reply: retrieval_pb2.RetrieveResponse) -> list[int]:
    found = reply.candidates
    pairs = zip(found.item_ids, found.sources, strict=True)
    return [item for item, source in pairs if source == common_pb2.SOURCE_TRENDING]


async def test_a_clicked_item_trends_for_others_and_not_for_its_clicker(
    retrieval: RetrievalStub, tenant: str, redis_url: str
) -> None:
    # Item 1234 is clicked by three users, item 77 by one.
    clicked, other = 1234, 77
    await project(
        redis_url,
        tenant,
        [*(event("click", f"u{n}", clicked) for n in (1, 2, 3)), event("click", "u4", other)],
    )
    newcomer = await retrieve(retrieval, tenant, NEWCOMER)
    assert list(newcomer.candidates.item_ids[:2]) == [clicked, other]
    assert list(newcomer.candidates.sources[:2]) == [common_pb2.SOURCE_TRENDING] * 2
    assert newcomer.candidates.scores[0] == pytest.approx(3.0, rel=1e-3)  # decayed clicks
    assert list(newcomer.degraded) == []
    assert "trending" in [s.stage for s in newcomer.stages]

    # Another known user gets it too (from ANN or trending); the clickers never get it back.
    other_user = await retrieve(retrieval, tenant, "u9")
    assert clicked in other_user.candidates.item_ids
    for clicker in ("u1", "u2", "u3"):
        assert clicked not in (await retrieve(retrieval, tenant, clicker)).candidates.item_ids
    assert other in (await retrieve(retrieval, tenant, "u1")).candidates.item_ids


async def test_trending_follows_decay(
    retrieval: RetrievalStub, tenant: str, redis_url: str
) -> None:
    # Item 500: four clicks three hours ago (two left now); item 600: three clicks now.
    now = now_ms()
    await project(
        redis_url,
        tenant,
        [
            *(event("click", f"u{n}", 500, now - 3 * HOUR_MS) for n in range(4)),
            *(event("click", f"u{n}", 600, now) for n in range(10, 13)),
        ],
    )
    reply = await retrieve(retrieval, tenant, NEWCOMER)
    assert trending_of(reply)[:2] == [600, 500]
    assert list(reply.candidates.scores[:2]) == pytest.approx([3.0, 0.5], rel=1e-3)


async def test_trending_k_bounds_the_source(
    retrieval: RetrievalStub, tenant: str, redis_url: str
) -> None:
    await project(redis_url, tenant, [event("click", f"u{n}", 100 + n) for n in range(8)])
    assert len(trending_of(await retrieve(retrieval, tenant, NEWCOMER, trending_k=3))) == 3
    assert len(trending_of(await retrieve(retrieval, tenant, NEWCOMER))) == 8


async def test_a_failing_feature_service_does_not_fail_retrieval(
    retrieval: RetrievalStub, tenant: str, redis_url: str, feature: MeshServer, faults: Path
) -> None:
    await project(redis_url, tenant, [event("click", "u1", 1234)])
    set_faults(feature, faults, {"feature": {"GetTrendingItems": {"error_rate": 1.0}}})
    try:
        only_trending = await retrieve(retrieval, tenant, "u2")
        set_faults(feature, faults, {"feature": {"*": {"error_rate": 1.0}}})
        nothing = await retrieve(retrieval, tenant, "u3")
    finally:
        set_faults(feature, faults, {})
    # Trending fails alone: ANN and popular answer, trending is named.
    assert list(only_trending.degraded) == ["trending"]
    sources = set(only_trending.candidates.sources)
    assert sources == {common_pb2.SOURCE_ANN, common_pb2.SOURCE_POPULAR}
    report = {s.stage: s for s in only_trending.stages}["trending"]
    assert report.degraded and "UNAVAILABLE" in report.reason
    # The whole feature service fails: the user is read from the store all the same, so
    # ANN still answers; only trending (refreshed from the service) is named.
    assert list(nothing.degraded) == ["trending"]
    assert set(nothing.candidates.sources) == {common_pb2.SOURCE_ANN, common_pb2.SOURCE_POPULAR}
    assert len(nothing.user_features) == 4 * nothing.user_feature_dim > 0


async def test_an_unreachable_store_leaves_popularity_and_opens_the_breaker(
    artifacts_root: Path, feature: MeshServer, faults: Path, tenant: str
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    async with retrieval_server(artifacts_root, feature, faults, nowhere) as stub:
        replies = [await retrieve(stub, tenant, f"u{n}") for n in range(21)]
    for reply in replies:
        assert list(reply.degraded) == ["user_features"]
        assert set(reply.candidates.sources) == {common_pb2.SOURCE_POPULAR}
        assert len(reply.candidates.item_ids) >= 100
        assert reply.user_features == b"" and reply.user_features_default
    reasons = [{s.stage: s for s in reply.stages}["user_features"].reason for reply in replies]
    # Refused connections open the breaker: by the streak once it lasted 0.25 s, at the
    # latest by the failure rate after 20 reads. From then on the store is not tried.
    tried = [r for r in reasons if "feature store unreachable" in r]
    assert 5 <= len(tried) <= 20
    assert reasons[: len(tried)] == tried
    assert all("circuit to feature-store is open" in r for r in reasons[len(tried) :])


async def cache_for(
    feature: MeshServer, clock: ManualClock
) -> tuple[TrendingCache, Downstream[FeatureStub]]:
    client: Downstream[FeatureStub] = Downstream.open(
        "feature", f"127.0.0.1:{feature.port}", feature_pb2_grpc.FeatureServiceStub
    )
    cache = TrendingCache(
        client, size=50, min_clicks=0.1, refresh_s=1.0, max_age_s=10.0, wait_s=1.0, clock=clock
    )
    return cache, client


def refreshes(tenant: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "recmesh_retrieval_trending_refreshes_total", {"tenant": tenant, "outcome": outcome}
    )
    return value or 0.0


async def test_the_list_is_refreshed_at_most_once_a_period_and_served_while_young(
    feature: MeshServer, tenant: str, redis_url: str, faults: Path
) -> None:
    clock = ManualClock(1000.0)
    cache, client = await cache_for(feature, clock)
    tenant_var.set(tenant)
    try:
        await project(redis_url, tenant, [event("click", "u1", 11)])
        first = await cache.get(tenant)  # nothing yet: waits for the first fill
        assert first.ids.tolist() == [11] and first.problem == ""
        await project(redis_url, tenant, [event("click", "u1", 22), event("click", "u2", 22)])
        clock.advance(0.9)
        assert (await cache.get(tenant)).ids.tolist() == [11]  # young: no call
        assert refreshes(tenant, "ok") == 1
        clock.advance(0.2)
        stale = await cache.get(tenant)  # old: answered at once, refreshed behind
        assert stale.ids.tolist() == [11]
        await cache.idle()
        assert (await cache.get(tenant)).ids.tolist() == [22, 11]
        assert refreshes(tenant, "ok") == 2

        # The feature service fails: the list is served until it is max_age_s old.
        set_faults(feature, faults, {"feature": {"GetTrendingItems": {"error_rate": 1.0}}})
        clock.advance(5.0)
        kept = await cache.get(tenant)
        await cache.idle()
        assert kept.ids.tolist() == [22, 11] and kept.problem == ""
        assert refreshes(tenant, "failed") == 1
        clock.advance(0.5)
        await cache.get(tenant)  # within a period of the failed attempt: no new call
        assert refreshes(tenant, "failed") == 1
        clock.advance(5.0)
        gone = await cache.get(tenant)  # 10.5 s old, and the refresh fails again
        assert gone.ids.size == 0 and gone.problem.startswith("trending unavailable")
        assert refreshes(tenant, "failed") == 2

        set_faults(feature, faults, {})
        clock.advance(1.0)
        back = await cache.get(tenant)  # no list to serve: waits for the refresh
        assert back.ids.tolist() == [22, 11] and back.problem == ""
        assert np.allclose(back.clicks, [2.0, 1.0], rtol=1e-3)
    finally:
        set_faults(feature, faults, {})
        await cache.close()
        await client.close()
