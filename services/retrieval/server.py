"""Composition root of the retrieval service."""

from __future__ import annotations

from pathlib import Path

from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core.artifacts import resolve_current
from mesh import redis as mesh_redis
from mesh.service import Registration
from services.retrieval.catalog import LiveCatalog
from services.retrieval.index import RetrievalModels
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from services.retrieval.trending import TrendingCache
from services.runtime.model_service import (
    FeatureClient,
    ModelService,
    feature_client,
    model_service,
)
from services.runtime.user_view import UserViewReader


async def build_service(
    settings: RetrievalSettings, features: FeatureClient | None = None
) -> ModelService[RetrievalModels]:
    """Retrieval serving the artifact set under ``settings.artifacts``/current, swapping in
    each new ``current`` every ``settings.artifact_poll_s``.

    A request's user is read from the online store at ``settings.redis_url``
    (:class:`UserViewReader`); the trending lists and the live catalog are refreshed from
    ``features``, by default the feature service at ``settings.feature_addr`` (the
    in-process monolith passes a local one).

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: ``REDIS_URL`` is not set.
    """
    models = RetrievalModels(resolve_current(settings.artifacts))
    models.warm_up(settings.ann_k)
    features = features if features is not None else feature_client(settings)
    # The caches refresh in the background: a breaker of their own (mesh.client).
    background = features.background()
    trending = TrendingCache(
        background,
        size=settings.trending_list,
        min_clicks=settings.trending_min_clicks,
        refresh_s=settings.trending_refresh_s,
        max_age_s=settings.trending_max_age_s,
        wait_s=settings.feature_budget_s,
    )
    catalog = LiveCatalog(
        background,
        refresh_s=settings.catalog_refresh_s,
        max_age_s=settings.catalog_max_age_s,
        wait_s=settings.feature_budget_s,
    )
    store = mesh_redis.connect(settings.redis_url)
    users = UserViewReader(
        store, history_limit=settings.history_limit, cap_s=settings.feature_budget_s
    )
    servicer = RetrievalServicer(models, users, settings, trending, catalog)

    def load(path: Path, served: RetrievalModels) -> RetrievalModels:
        return RetrievalModels.replacing(path, served, settings.ann_k)

    registration = Registration.of(servicer, retrieval_pb2, retrieval_pb2_grpc, "RetrievalService")
    service = model_service(settings, registration, models, load, features)
    # The refreshes in flight end before the feature client they call through closes.
    service.cleanups.insert(0, trending.close)
    service.cleanups.insert(0, catalog.close)
    service.cleanups.append(store.aclose)
    return service
