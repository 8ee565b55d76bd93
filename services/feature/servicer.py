"""gRPC face of the feature store: validation and conversion between protobuf and arrays."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core.validation import check_user_id, matrix_from_proto, matrix_to_proto, vector_from_bytes
from mesh.context import current_tenant
from mesh.errors import InvalidArgument
from services.feature.asof import AsOfReader
from services.feature.materialize import Materializer
from services.feature.store import FeatureStore

Context = Any


class FeatureServicer(feature_pb2_grpc.FeatureServiceServicer):
    """Implements ``recmesh.feature.v1.FeatureService`` over a :class:`FeatureStore`."""

    def __init__(
        self,
        store: FeatureStore,
        materializer: Materializer,
        history_limit: int,
        max_batch: int,
        as_of: AsOfReader,
    ) -> None:
        self._store = store
        self._materializer = materializer
        self._as_of = as_of
        self._history_limit = history_limit
        self._max_batch = max_batch

    async def GetUserFeatures(
        self, request: feature_pb2.GetUserFeaturesRequest, context: Context
    ) -> feature_pb2.GetUserFeaturesResponse:
        """The user's features now (``as_of_ms`` 0: one Redis round trip) or as of a past
        time, from the event log (:mod:`services.feature.asof`).

        Raises:
            InvalidArgument: bad ``user_id`` or ``history_limit``, ``as_of_ms`` below 0 or
                in the future.
            FailedPrecondition: nothing materialised for the tenant, or ``as_of_ms`` before
                the event log's horizon.
            Unavailable: an as-of read could not reach the events service.
        """
        check_user_id(request.user_id)
        if request.history_limit < 0:
            raise InvalidArgument("history_limit must be >= 0", field="history_limit")
        limit = request.history_limit or self._history_limit
        tenant = current_tenant()
        if request.as_of_ms == 0:
            user = await self._store.get_user(tenant, request.user_id, limit)
        elif not 0 < request.as_of_ms <= int(time.time() * 1000):
            raise InvalidArgument(
                "as_of_ms must be a past time in ms since the epoch (0 = now), not in the future",
                field="as_of_ms",
            )
        else:
            user = await self._as_of.user(tenant, request.user_id, limit, request.as_of_ms)
        return feature_pb2.GetUserFeaturesResponse(
            features=user.features.astype("<f4").tobytes(),
            dim=user.features.size,
            history=user.history,
            is_default=user.is_default,
            category_shares=user.category_shares,
        )

    async def GetItemFeatures(
        self, request: feature_pb2.GetItemFeaturesRequest, context: Context
    ) -> feature_pb2.GetItemFeaturesResponse:
        """Rows of ``item_ids`` and counters of ``counter_item_ids``, one Redis round trip.

        Raises:
            InvalidArgument: more than ``max_batch`` ids in either list.
            FailedPrecondition: nothing materialised for the tenant.
        """
        for name in ("item_ids", "counter_item_ids"):
            asked = len(getattr(request, name))
            if asked > self._max_batch:
                raise InvalidArgument(
                    f"at most {self._max_batch} item ids per call, got {asked}", field=name
                )
        ids = list(request.item_ids)
        items = await self._store.get_items(current_tenant(), ids, list(request.counter_item_ids))
        reply = feature_pb2.GetItemFeaturesResponse(
            features=matrix_to_proto(items.features),
            categories=items.categories.tolist(),
            missing_item_ids=np.asarray(ids, dtype=np.int64)[items.missing].tolist(),
        )
        if items.counters is not None:
            reply.counters.CopyFrom(
                feature_pb2.ItemCounters(
                    impressions=items.counters.impressions.tolist(),
                    clicks=items.counters.clicks.tolist(),
                    conversions=items.counters.conversions.tolist(),
                    as_of_ms=items.counters.as_of_ms,
                )
            )
        return reply

    async def GetTrendingItems(
        self, request: feature_pb2.GetTrendingItemsRequest, context: Context
    ) -> feature_pb2.GetTrendingItemsResponse:
        """The tenant's ``k`` items with the most decayed clicks now (empty when none).

        Raises:
            InvalidArgument: ``k`` outside ``1..max_batch``, ``min_clicks`` negative or not
                finite.
        """
        if not 0 < request.k <= self._max_batch:
            raise InvalidArgument(f"k must be in 1..{self._max_batch}", field="k")
        if not 0.0 <= request.min_clicks < math.inf:
            raise InvalidArgument("min_clicks must be a finite number >= 0", field="min_clicks")
        found = await self._store.get_trending(current_tenant(), request.k, request.min_clicks)
        return feature_pb2.GetTrendingItemsResponse(
            item_ids=found.item_ids, clicks=found.clicks, as_of_ms=found.as_of_ms
        )

    async def WriteUserFeatures(
        self, request: feature_pb2.WriteUserFeaturesRequest, context: Context
    ) -> feature_pb2.WriteFeaturesResponse:
        tenant = current_tenant()
        info = await self._materializer.require_info(tenant)
        rows = np.empty((len(request.users), info.user_dim), dtype=np.float32)
        for n, user in enumerate(request.users):
            check_user_id(user.user_id, field=f"users[{n}].user_id")
            rows[n] = vector_from_bytes(user.features, info.user_dim, f"users[{n}].features")
        written = await self._store.write_users(
            tenant,
            [u.user_id for u in request.users],
            rows,
            [list(u.history) for u in request.users],
        )
        return feature_pb2.WriteFeaturesResponse(written=written)

    async def WriteItemFeatures(
        self, request: feature_pb2.WriteItemFeaturesRequest, context: Context
    ) -> feature_pb2.WriteFeaturesResponse:
        rows = matrix_from_proto(request.features, len(request.item_ids), field="features")
        written = await self._store.write_items(
            current_tenant(), list(request.item_ids), rows, list(request.categories)
        )
        return feature_pb2.WriteFeaturesResponse(written=written)

    async def GetItemChanges(
        self, request: feature_pb2.GetItemChangesRequest, context: Context
    ) -> feature_pb2.GetItemChangesResponse:
        """Items written by ``WriteItemFeatures`` or changed by the catalog at or after
        ``since_ms``, oldest first, with their state when asked.

        Raises:
            InvalidArgument: ``since_ms`` or ``limit`` is negative, or ``limit`` is above
                the service's batch limit while ``with_state`` is set.
        """
        if request.since_ms < 0:
            raise InvalidArgument("since_ms must be >= 0", field="since_ms")
        if request.limit < 0 or (request.with_state and request.limit > self._max_batch):
            raise InvalidArgument(
                f"limit must be in 0..{self._max_batch} (1.. with with_state)", field="limit"
            )
        if request.with_state and request.limit == 0:
            raise InvalidArgument("with_state needs a limit", field="limit")
        tenant = current_tenant()
        changes = await self._store.item_changes(tenant, request.since_ms, request.limit)
        reply = feature_pb2.GetItemChangesResponse(
            item_ids=changes.item_ids, as_of_ms=changes.as_of_ms, more=changes.more
        )
        if request.with_state and changes.item_ids:
            states = await self._store.item_states(tenant, changes.item_ids)
            reply.features.CopyFrom(matrix_to_proto(states.rows.features))
            reply.categories.extend(states.rows.categories.tolist())
            reply.available.extend(states.available)
            reply.names.extend(states.names)
        return reply

    async def Materialize(
        self, request: feature_pb2.MaterializeRequest, context: Context
    ) -> feature_pb2.MaterializeResponse:
        result = await self._materializer.materialize(current_tenant(), force=request.force)
        return feature_pb2.MaterializeResponse(
            version=result.version, users=result.users, items=result.items, loaded=result.loaded
        )

    async def DescribeViews(
        self, request: feature_pb2.DescribeViewsRequest, context: Context
    ) -> feature_pb2.DescribeViewsResponse:
        info = await self._store.info(current_tenant())
        if info is None:
            return feature_pb2.DescribeViewsResponse()
        return feature_pb2.DescribeViewsResponse(
            views=[
                feature_pb2.FeatureViewInfo(name="user", dim=info.user_dim, entities=info.users),
                feature_pb2.FeatureViewInfo(name="item", dim=info.item_dim, entities=info.items),
            ],
            materialized_version=info.version,
        )
