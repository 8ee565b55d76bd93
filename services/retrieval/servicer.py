"""``recmesh.retrieval.v1.RetrievalService``: user features (read from the online store in
process, :mod:`services.runtime.user_view`) → user tower → ANN, then the trending and
popular items."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from recmesh.common.v1 import common_pb2
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core.catalog import is_live
from core.validation import check_user_id
from mesh.context import current_tenant, tenant_var
from mesh.cpu import CpuAccount
from mesh.errors import InvalidArgument
from mesh.stages import StageClock
from services.retrieval.catalog import LiveCatalog
from services.retrieval.index import Candidates, RetrievalModels, merge
from services.retrieval.settings import RetrievalSettings
from services.retrieval.trending import TrendingCache
from services.runtime.user_view import READ_FAILURES, UserFeatures, UserViewReader

log = logging.getLogger(__name__)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Merged, deduplicated candidates with the user's history removed: the ANN source,
    then the tenant's trending items, then the popular ones (an item found by several keeps
    the first source's score and name).

    Unknown users (default features) get trending and popular items only. When the user's
    features cannot be read (the store out of reach or slower than the feature budget),
    retrieval still answers from popularity (and from a trending list it still may serve,
    see :mod:`services.retrieval.trending`) and names ``user_features`` in ``degraded``; a
    request with no trending list to serve names ``trending``. The user is read from the
    store in process; trending and the live catalog come from per-tenant state the process
    keeps (:class:`TrendingCache`, :class:`LiveCatalog`), refreshed from the feature service
    in the background, so a request makes no call.
    """

    def __init__(
        self,
        models: RetrievalModels,
        users: UserViewReader,
        settings: RetrievalSettings,
        trending: TrendingCache,
        catalog: LiveCatalog,
    ) -> None:
        self.models = models
        self._users = users
        self._settings = settings
        self._trending = trending
        self._catalog = catalog
        self.cpu = CpuAccount("retrieval")
        """The CPU this service spends per tenant; each answer reports its call's
        (``cost.cpu_us``, ``mesh.cpu``)."""

    def _k(self, value: int, default: int, field: str) -> int:
        if value < 0 or value > self._settings.max_k:
            raise InvalidArgument(f"{field} must be in 0..{self._settings.max_k}", field=field)
        return value or default

    async def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: Any
    ) -> retrieval_pb2.RetrieveResponse:
        """The user's candidates: ``ann_k`` from ANN, ``trending_k`` trending and
        ``popular_k`` popular ones (0: the service defaults), merged, seen items removed;
        ``cost`` says what the call cost (CPU, ``mesh.cpu``).

        Raises:
            InvalidArgument: bad ``user_id``, a count outside ``0..max_k``, or no tenant in
                the call's metadata.
        """
        response, cpu_s = await self.cpu.serve(tenant_var.get(), self._retrieve(request))
        response.cost.cpu_us = round(cpu_s * 1e6)
        return response

    async def _retrieve(
        self, request: retrieval_pb2.RetrieveRequest
    ) -> retrieval_pb2.RetrieveResponse:
        check_user_id(request.user_id)
        tenant = current_tenant()
        ann_k = self._k(request.ann_k, self._settings.ann_k, "ann_k")
        popular_k = self._k(request.popular_k, self._settings.popular_k, "popular_k")
        trending_k = self._k(request.trending_k, self._settings.trending_k, "trending_k")
        fresh_k = self._k(request.fresh_k, self._settings.fresh_k, "fresh_k")
        models = self.models
        clock = StageClock("retrieval")
        user: UserFeatures | None = None
        problem = ""
        try:
            user = await self._users.read(tenant, request.user_id)
        except READ_FAILURES as exc:
            problem = f"user features unavailable: {exc or type(exc).__name__}"
            log.warning("%s", problem)
        clock.lap(
            "user_features", budget_s=self._settings.feature_budget_s, degraded_reason=problem
        )
        catalog = await self._catalog.view(tenant, models)
        clock.lap(
            "catalog",
            budget_s=self._settings.feature_budget_s,
            degraded_reason=catalog.problem,
        )
        seen = np.asarray(user.history if user is not None else [], dtype=np.int64)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        ann = empty
        if user is not None and not user.is_default and user.features.size == models.user_dim:
            ann = catalog.index.search_one(models.embed(user.features), ann_k + seen.size)
        clock.lap("ann", candidates_out=ann[0].size)
        listed = await self._trending.get(tenant)
        trending = (listed.ids[: trending_k + seen.size], listed.clicks[: trending_k + seen.size])
        clock.lap(
            "trending",
            candidates_out=trending[0].size,
            budget_s=self._settings.feature_budget_s,
            degraded_reason=listed.problem,
        )
        clock.reports[-1].details["age_s"] = listed.age_s if listed.age_s < math.inf else -1.0
        popular = catalog.index.popular(popular_k + seen.size)
        fresh_ids = catalog.fresh[:fresh_k]
        fresh = (fresh_ids, np.zeros(fresh_ids.size, np.float32))
        candidates = merge(
            [
                (*ann, common_pb2.SOURCE_ANN),
                (*trending, common_pb2.SOURCE_TRENDING),
                (*popular, common_pb2.SOURCE_POPULAR),
                (*fresh, common_pb2.SOURCE_FRESH),
            ],
            seen,
        )
        servable = catalog.servable(candidates.ids)
        candidates = Candidates(
            candidates.ids[servable], candidates.scores[servable], candidates.sources[servable]
        )
        clock.lap(
            "merge",
            candidates_in=ann[0].size + trending[0].size + popular[0].size + fresh[0].size,
            candidates_out=candidates.ids.size,
        )
        return retrieval_pb2.RetrieveResponse(
            candidates=common_pb2.Candidates(
                item_ids=candidates.ids.tolist(),
                scores=candidates.scores.tolist(),
                sources=candidates.sources.tolist(),
            ),
            user_features=user.features.tobytes() if user is not None else b"",
            user_feature_dim=user.features.size if user is not None else 0,
            user_features_default=user is None or user.is_default,
            model_version=models.version,
            stages=clock.reports,
            degraded=clock.degraded,
            names={
                int(i): catalog.names[int(i)]
                for i in candidates.ids
                if is_live(int(i)) and int(i) in catalog.names
            },
        )
