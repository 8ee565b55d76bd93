"""Composition root of the ranking service."""

from __future__ import annotations

from pathlib import Path

from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from core.artifacts import resolve_current
from mesh.service import Registration
from services.ranking.models import RankingModels
from services.ranking.servicer import RankingServicer
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
    servicer = RankingServicer(models, features, settings)

    def load(path: Path, served: RankingModels) -> RankingModels:
        return RankingModels.replacing(path, served, settings.head_weights, settings.prerank_keep)

    registration = Registration.of(servicer, ranking_pb2, ranking_pb2_grpc, "RankingService")
    return model_service(settings, registration, models, load, features)
