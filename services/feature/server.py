"""Composition root of the feature service."""

from __future__ import annotations

import asyncio

from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh import redis as mesh_redis
from mesh.service import Registration, Service
from services.feature.materialize import Materializer
from services.feature.servicer import FeatureServicer
from services.feature.settings import FeatureSettings
from services.feature.store import RedisFeatureStore


async def build_service(settings: FeatureSettings) -> Service:
    """The feature service on ``settings.port`` backed by Redis at ``settings.redis_url``."""
    client = mesh_redis.connect(settings.redis_url)
    bulk = mesh_redis.connect_blocking(settings.redis_url)
    store = RedisFeatureStore(client, history_cap=settings.history_cap, bulk=bulk)
    servicer = FeatureServicer(
        store,
        Materializer(store, settings.artifacts),
        history_limit=settings.history_limit,
        max_batch=settings.max_batch,
    )
    return Service(
        [Registration.of(servicer, feature_pb2, feature_pb2_grpc, "FeatureService")],
        checks=[mesh_redis.redis_check(client)],
        cleanups=[client.aclose, lambda: asyncio.to_thread(bulk.close)],
    )
