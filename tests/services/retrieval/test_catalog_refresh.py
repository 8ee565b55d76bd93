"""Retrieval's live catalog refresh against the real feature service: what a refresh read is
applied even when a later page of the same refresh fails."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core.artifacts import resolve_current
from core.catalog import delete_event
from mesh.client import Downstream, open_channel
from mesh.context import tenant_var
from mesh.testing import tenant_metadata
from services.retrieval.catalog import LiveCatalog
from services.retrieval.index import RetrievalModels
from tests.projected import feature_service, now_ms, project


class BrokenAfterFirstPage:
    """The feature service's stub, whose ``GetItemChanges`` fails (UNAVAILABLE, every
    retry too) after its first call while ``broken`` is set: a refresh cut mid-way."""

    def __init__(self, stub: feature_pb2_grpc.FeatureServiceStub) -> None:
        self._stub = stub
        self.calls = 0
        self.broken = True

    async def GetItemChanges(
        self, request: feature_pb2.GetItemChangesRequest, **kwargs: Any
    ) -> feature_pb2.GetItemChangesResponse:
        self.calls += 1
        if self.broken and self.calls > 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="feature service cut off by the test",
            )
        call: Callable[..., Awaitable[feature_pb2.GetItemChangesResponse]]
        call = self._stub.GetItemChanges  # type: ignore[assignment]
        return await call(request, **kwargs)


async def test_a_refresh_cut_after_its_first_page_still_withdraws_what_it_read(
    redis_url: str, artifacts_root: Path, tmp_path: Path
) -> None:
    tenant = "rc" + uuid.uuid4().hex[:8]
    deletes = []
    for number in (11, 12, 13):
        event = delete_event(str(number), now_ms())
        event.item_id = number  # a set item: its decimal number (the events service's rule)
        deletes.append(event)
    models = RetrievalModels(resolve_current(artifacts_root))

    async with feature_service(redis_url, artifacts_root, tmp_path / "faults.json") as feature:
        channel = open_channel(f"127.0.0.1:{feature.port}")
        await feature_pb2_grpc.FeatureServiceStub(channel).Materialize(
            feature_pb2.MaterializeRequest(), metadata=tenant_metadata(tenant)
        )
        for event in deletes:  # each applied in its own millisecond: one change per page
            await project(redis_url, tenant, [event])
            await asyncio.sleep(0.003)
        stub = BrokenAfterFirstPage(feature_pb2_grpc.FeatureServiceStub(channel))
        catalog = LiveCatalog(
            Downstream("feature", stub, channel=channel),  # type: ignore[arg-type]
            refresh_s=0.05,
            max_age_s=0.1,
            wait_s=5.0,
            page=1,  # one change per page: the second page fails
        )
        tenant_var.set(tenant)
        try:
            view = await catalog.view(tenant, models)
            assert "catalog not refreshed" in view.problem
            # The first page's delete is withdrawn, though no later change will arrive.
            assert np.asarray(view.withdrawn).tolist() == [11]
            assert not view.servable(np.asarray([11, 12], np.int64))[0]

            stub.broken = False
            seen: list[int] = []
            for _ in range(100):
                view = await catalog.view(tenant, models)
                seen = sorted(np.asarray(view.withdrawn).tolist())
                if seen == [11, 12, 13] and not view.problem:
                    break
                await asyncio.sleep(0.05)
            assert seen == [11, 12, 13]
        finally:
            await catalog.close()
            await channel.close()
