"""``recmesh.retrieval.v1.RetrievalService``: user features → user tower → ANN + popular."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core.validation import check_user_id
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.errors import InvalidArgument
from mesh.stages import StageClock
from services.retrieval.index import RetrievalModels, merge
from services.retrieval.settings import RetrievalSettings

log = logging.getLogger(__name__)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Merged, deduplicated candidates with the user's history removed.

    Unknown users (default features) get popular items only. When the feature service
    fails, retrieval still answers from popularity and names ``user_features`` in
    ``degraded``.
    """

    def __init__(
        self,
        models: RetrievalModels,
        features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        settings: RetrievalSettings,
    ) -> None:
        self.models = models
        self._features = features
        self._settings = settings

    def _k(self, value: int, default: int, field: str) -> int:
        if value < 0 or value > self._settings.max_k:
            raise InvalidArgument(f"{field} must be in 0..{self._settings.max_k}", field=field)
        return value or default

    async def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: Any
    ) -> retrieval_pb2.RetrieveResponse:
        check_user_id(request.user_id)
        ann_k = self._k(request.ann_k, self._settings.ann_k, "ann_k")
        popular_k = self._k(request.popular_k, self._settings.popular_k, "popular_k")
        models = self.models
        clock = StageClock("retrieval")
        user: feature_pb2.GetUserFeaturesResponse | None = None
        try:
            user = await self._features.call(
                self._features.stub.GetUserFeatures,
                feature_pb2.GetUserFeaturesRequest(user_id=request.user_id),
                cap_s=self._settings.feature_budget_s,
                idempotent=True,
            )
        except CALL_FAILURES as exc:
            log.warning("user features unavailable: %s", describe_failure(exc))
        clock.lap(
            "user_features",
            budget_s=self._settings.feature_budget_s,
            degraded_reason="" if user is not None else "feature service unavailable",
        )
        seen = np.asarray(user.history if user is not None else [], dtype=np.int64)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        ann = empty
        if user is not None and not user.is_default and user.dim == models.user_dim:
            vector = np.frombuffer(user.features, dtype="<f4")
            ann = models.search(models.embed(vector), ann_k + seen.size)
        clock.lap("ann", candidates_out=ann[0].size)
        popular = (models.popular_ids[: popular_k + seen.size], models.popular_scores)
        popular = (popular[0], popular[1][: popular[0].size])
        candidates = merge(ann, popular, seen, common_pb2.SOURCE_ANN, common_pb2.SOURCE_POPULAR)
        clock.lap(
            "merge",
            candidates_in=ann[0].size + popular[0].size,
            candidates_out=candidates.ids.size,
        )
        return retrieval_pb2.RetrieveResponse(
            candidates=common_pb2.Candidates(
                item_ids=candidates.ids.tolist(),
                scores=candidates.scores.tolist(),
                sources=candidates.sources.tolist(),
            ),
            user_features=user.features if user is not None else b"",
            user_feature_dim=user.dim if user is not None else 0,
            user_features_default=user is None or user.is_default,
            model_version=models.version,
            stages=clock.reports,
            degraded=clock.degraded,
        )
