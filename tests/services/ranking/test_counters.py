"""Ranking's item counter cache against a real feature server: lookups never wait, a
tenant's counters are fetched at most once a period, kept through failures until too old,
and bounded in number."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from prometheus_client import REGISTRY
from recmesh.feature.v1 import feature_pb2_grpc

from mesh.client import Downstream
from mesh.context import tenant_var
from mesh.faults import write_flags
from mesh.server import MeshServer
from mesh.testing import ManualClock
from services.ranking.counters import CounterCache
from tests.projected import event, feature_service, project

if TYPE_CHECKING:
    FeatureStub = feature_pb2_grpc.FeatureServiceAsyncStub


@pytest.fixture(scope="module")
async def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counters") / "faults.json"


@pytest.fixture(scope="module")
async def feature(redis_url: str, artifacts_root: Path, faults: Path) -> AsyncIterator[MeshServer]:
    async with feature_service(redis_url, artifacts_root, faults) as running:
        yield running


@pytest.fixture
async def client(feature: MeshServer) -> AsyncIterator[Downstream[FeatureStub]]:
    downstream: Downstream[FeatureStub] = Downstream.open(
        "feature", f"127.0.0.1:{feature.port}", feature_pb2_grpc.FeatureServiceStub
    )
    yield downstream
    await downstream.close()


def fetches(tenant: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "recmesh_ranking_counter_fetches_total", {"tenant": tenant, "outcome": outcome}
    )
    return value or 0.0


def items(*ids: int) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64)


async def test_counters_are_fetched_behind_the_lookups_once_a_period(
    client: Downstream[FeatureStub], feature: MeshServer, faults: Path, redis_url: str
) -> None:
    tenant = "cc" + uuid.uuid4().hex[:8]
    tenant_var.set(tenant)
    clock = ManualClock(100.0)
    cache = CounterCache(
        client, refresh_s=1.0, max_age_s=10.0, max_entries=1000, batch=100, clock=clock
    )
    await project(redis_url, tenant, [event("impression", "u1", 3), event("click", "u1", 3)])
    try:
        first = cache.lookup(tenant, items(3, 4))  # nothing held: no counters, no wait
        assert not first.known.any() and first.problem == ""
        await cache.idle()
        held = cache.lookup(tenant, items(3, 4))
        assert held.known.all()
        assert held.clicks.tolist() == pytest.approx([1.0, 0.0], rel=1e-3)
        assert held.impressions.tolist() == pytest.approx([1.0, 0.0], rel=1e-3)
        assert fetches(tenant, "ok") == 1

        # A new item within the period waits for the next fetch, a period after the last.
        clock.advance(0.5)
        assert not cache.lookup(tenant, items(5)).known.any()
        await cache.idle()
        assert fetches(tenant, "ok") == 1
        clock.advance(0.5)
        cache.lookup(tenant, items(5))
        await cache.idle()
        assert fetches(tenant, "ok") == 2 and cache.lookup(tenant, items(5)).known.all()

        # The feature service fails: what is held serves until max_age_s, then it is said.
        write_flags(faults, {"feature": {"GetItemFeatures": {"error_rate": 1.0}}})
        feature.faults.reload()
        clock.advance(5.0)
        kept = cache.lookup(tenant, items(3, 4, 5))
        await cache.idle()
        assert kept.known.all() and fetches(tenant, "failed") == 1
        clock.advance(5.5)
        gone = cache.lookup(tenant, items(3, 4, 5))
        assert not gone.known.any() and gone.problem.startswith("UNAVAILABLE")
        await cache.idle()
        assert fetches(tenant, "failed") == 2

        write_flags(faults, {})
        feature.faults.reload()
        clock.advance(1.0)
        cache.lookup(tenant, items(3))
        await cache.idle()
        back = cache.lookup(tenant, items(3, 4, 5))
        assert back.known.all() and back.problem == ""
    finally:
        write_flags(faults, {})
        feature.faults.reload()
        await cache.close()


async def test_the_least_recently_used_items_are_evicted(
    client: Downstream[FeatureStub],
) -> None:
    tenant = "cc" + uuid.uuid4().hex[:8]
    tenant_var.set(tenant)
    clock = ManualClock(100.0)
    cache = CounterCache(
        client, refresh_s=1.0, max_age_s=10.0, max_entries=3, batch=100, clock=clock
    )
    try:
        cache.lookup(tenant, items(1, 2, 3))
        await cache.idle()
        clock.advance(0.5)
        assert cache.lookup(tenant, items(2, 3, 1)).known.all()  # 2 is now the least recent
        clock.advance(1.0)
        cache.lookup(tenant, items(4))
        await cache.idle()
        assert len(cache) == 3
        assert cache.lookup(tenant, items(1, 3, 4)).known.all()
        assert not cache.lookup(tenant, items(2)).known.any()
    finally:
        await cache.close()
