"""Composition root of the feature service."""

from __future__ import annotations

import asyncio

from recmesh.events.v1 import events_pb2_grpc
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh import redis as mesh_redis
from mesh.client import Downstream
from mesh.service import Registration, Service
from mesh.tls import Transport
from services.feature.asof import AsOfReader, EventsClient
from services.feature.materialize import Materializer
from services.feature.servicer import FeatureServicer
from services.feature.settings import FeatureSettings
from services.feature.store import RedisFeatureStore


async def build_service(settings: FeatureSettings, events: EventsClient | None = None) -> Service:
    """The feature service on ``settings.port`` backed by Redis at ``settings.redis_url``.

    ``events`` (read by as-of requests only) defaults to the events service at
    ``settings.events_addr``; the in-process monolith passes a local one. Its channel
    connects on the first as-of request: the live path never needs it, so the feature
    service neither waits for nor depends on the events service to be SERVING.
    """
    client = mesh_redis.connect(settings.redis_url)
    bulk = mesh_redis.connect_blocking(settings.redis_url)
    store = RedisFeatureStore(
        client, history_cap=settings.history_cap, bulk=bulk, half_life_s=settings.half_life_s
    )
    if events is None:
        events = Downstream.open(
            "events",
            settings.events_addr,
            events_pb2_grpc.EventServiceStub,
            transport=Transport.of(settings),
            pipe=settings.piped("events"),
        )
    servicer = FeatureServicer(
        store,
        Materializer(store, settings.artifacts),
        history_limit=settings.history_limit,
        max_batch=settings.max_batch,
        as_of=AsOfReader(
            store,
            events,
            history_cap=settings.history_cap,
            page=settings.events_page,
            budget_s=settings.events_budget_s,
        ),
    )
    return Service(
        [Registration.of(servicer, feature_pb2, feature_pb2_grpc, "FeatureService")],
        checks=[mesh_redis.redis_check(client)],
        cleanups=[client.aclose, lambda: asyncio.to_thread(bulk.close), events.close],
    )
