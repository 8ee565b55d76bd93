"""Composition root of the ranking service."""

from __future__ import annotations

from pathlib import Path

from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from core.artifacts import resolve_current
from mesh.service import Registration
from services.ranking.counters import CounterCache
from services.ranking.models import RankingModels
from services.ranking.servicer import COUNTER_BATCH, RankingServicer
from services.ranking.settings import RankingSettings
from services.runtime.model_service import (
    FeatureClient,
    ModelService,
    feature_client,
    model_service,
)


async def build_service(
    settings: RankingSettings, features: FeatureClient | None = None
) -> ModelService[RankingModels]:
    """Ranking serving the artifact set under ``settings.artifacts``/current, swapping in
    each new ``current`` every ``settings.artifact_poll_s``.

    ``features`` defaults to the feature service at ``settings.feature_addr``; the
    in-process monolith passes a local one.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: the head weights name a head the ranker does not have.
    """
    models = RankingModels(resolve_current(settings.artifacts), settings.head_weights)
    models.warm_up(settings.prerank_keep)
    features = features if features is not None else feature_client(settings)
    counters = CounterCache(
        features,
        refresh_s=settings.counters_refresh_s,
        max_age_s=settings.counters_max_age_s,
        max_entries=settings.counters_entries,
        batch=COUNTER_BATCH,
    )
    servicer = RankingServicer(models, features, settings, counters=counters)

    def load(path: Path, served: RankingModels) -> RankingModels:
        return RankingModels.replacing(path, served, settings.head_weights, settings.prerank_keep)

    registration = Registration.of(servicer, ranking_pb2, ranking_pb2_grpc, "RankingService")
    service = model_service(settings, registration, models, load, features)
    # The reads in flight end before the feature client they call through closes.
    service.cleanups.insert(0, counters.close)
    if servicer.cascade.changes is not None:
        service.cleanups.insert(0, servicer.cascade.changes.close)
    return service
