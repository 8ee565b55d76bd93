"""``recmesh.ranking.v1.RankingService``: pre-rank → heavy ranker → re-rank."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from mesh.client import describe_failure
from mesh.errors import DeadlineExceeded, InvalidArgument
from services.ranking.models import RankingModels
from services.ranking.rerank import diversify
from services.ranking.settings import RankingSettings
from services.stages import StageClock
from services.validation import check_user_id, matrix_from_proto, vector_from_bytes

log = logging.getLogger(__name__)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Ranks a candidate list for one user.

    Without item features (feature service down) the candidates keep their incoming
    order and ``item_features`` is named in ``degraded``; without user features the
    view default (zeros) is used and ``user_features`` is named.
    """

    def __init__(
        self,
        models: RankingModels,
        features: feature_pb2_grpc.FeatureServiceAsyncStub,
        settings: RankingSettings,
    ) -> None:
        self.models = models
        self._features = features
        self._settings = settings

    def _validate(self, request: ranking_pb2.RankRequest) -> int:
        check_user_id(request.user_id)
        n = request.num_items or 10
        if not 0 < n <= self._settings.max_items:
            raise InvalidArgument(
                f"num_items must be in 1..{self._settings.max_items}", field="num_items"
            )
        candidates = request.candidates
        if len(candidates.item_ids) > self._settings.max_candidates:
            raise InvalidArgument(
                f"at most {self._settings.max_candidates} candidates", field="candidates.item_ids"
            )
        for name in ("scores", "sources"):
            if len(getattr(candidates, name)) not in (0, len(candidates.item_ids)):
                raise InvalidArgument(
                    f"candidates.{name} must be empty or as long as item_ids",
                    field=f"candidates.{name}",
                )
        if request.prerank_keep < 0:
            raise InvalidArgument("prerank_keep must be >= 0", field="prerank_keep")
        return n

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: Any
    ) -> ranking_pb2.RankResponse:
        n = self._validate(request)
        models = self.models
        ids = np.asarray(request.candidates.item_ids, dtype=np.int64)
        incoming = request.candidates
        scores = np.asarray(incoming.scores or np.zeros(ids.size), dtype=np.float32)
        sources = np.asarray(incoming.sources or np.zeros(ids.size), dtype=np.int32)
        clock = StageClock()
        user_reason = ""
        if request.user_features:
            user = vector_from_bytes(request.user_features, models.user_dim, "user_features")
        else:
            user = np.zeros(models.user_dim, dtype=np.float32)
            user_reason = "no user features sent"
        clock.lap("user_features", degraded_reason=user_reason)

        items: feature_pb2.GetItemFeaturesResponse | None = None
        try:
            items = await self._features.GetItemFeatures(
                feature_pb2.GetItemFeaturesRequest(item_ids=ids.tolist()),
                timeout=self._settings.feature_budget_s,
            )
        except (grpc.aio.AioRpcError, DeadlineExceeded) as exc:
            log.warning("item features unavailable: %s", describe_failure(exc))
        clock.lap(
            "item_features",
            candidates_in=ids.size,
            budget_s=self._settings.feature_budget_s,
            degraded_reason="" if items is not None else "feature service unavailable",
        )
        if items is None or ids.size == 0:
            keep = np.arange(min(n, ids.size))
            return self._response(ids[keep], scores[keep], sources[keep], clock)

        matrix = matrix_from_proto(items.features, ids.size, "features")
        categories = np.asarray(items.categories, dtype=np.int32)
        pre = models.prerank_scores(user, matrix)
        keep_n = request.prerank_keep or self._settings.prerank_keep
        survivors = np.argsort(-pre, kind="stable")[: max(keep_n, n)]
        clock.lap("prerank", candidates_in=ids.size, candidates_out=survivors.size)

        final = pre[survivors]
        if request.heavy_mode != ranking_pb2.HEAVY_MODE_OFF:
            final = models.heavy_scores(user, np.ascontiguousarray(matrix[survivors]))
            clock.lap("heavy", candidates_in=survivors.size, candidates_out=survivors.size)
        order = survivors[np.argsort(-final, kind="stable")]
        rank_score = np.empty(ids.size, dtype=np.float32)
        rank_score[survivors] = final
        chosen = diversify(order, categories, n, self._settings.max_per_category)
        clock.lap("rerank", candidates_in=order.size, candidates_out=chosen.size)
        return self._response(ids[chosen], rank_score[chosen], sources[chosen], clock)

    def _response(
        self,
        ids: np.ndarray[Any, np.dtype[np.int64]],
        scores: np.ndarray[Any, np.dtype[np.float32]],
        sources: np.ndarray[Any, np.dtype[np.int32]],
        clock: StageClock,
    ) -> ranking_pb2.RankResponse:
        return ranking_pb2.RankResponse(
            ranked=common_pb2.Candidates(
                item_ids=ids.tolist(), scores=scores.tolist(), sources=sources.tolist()
            ),
            stages=clock.reports,
            degraded=clock.degraded,
            model_version=self.models.version,
        )
