"""Composition root of the projector."""

from __future__ import annotations

import socket
from collections.abc import Callable

from core import keys
from mesh import redis as mesh_redis
from mesh.health import HealthCheck
from mesh.service import Service
from mesh.tenants import load_tenants
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections
from services.projector.rebuild import Retention
from services.projector.settings import ProjectorSettings

CATALOG_BATCH = 50
"""Entries per read of the catalog stream: small, so one read round stays short."""

STALL_S = 10.0
"""Seconds without a successful read of the log after which the projector is unhealthy."""


async def build_service(settings: ProjectorSettings) -> Service:
    """The projector of every tenant in ``settings.tenants`` (a reader of the log and one
    of the catalog stream, :mod:`services.projector.consumer`): no gRPC API of its own, a
    health service that is SERVING while Redis answers and it read the log in the last
    :data:`STALL_S` seconds, and
    ``/metrics`` (lag, events handled).

    Raises:
        ConfigError: the tenant file is missing or invalid, or ``REDIS_URL`` is not set.
    """
    tenants = load_tenants(settings.tenants)
    client = mesh_redis.connect(settings.redis_url)
    projections = Projections(
        client, settings.history_cap, settings.half_life_s, settings.applied_ttl_s
    )

    def reader(
        stream: Callable[[str], str], name: str, batch: int, linger_ms: int = 0
    ) -> StreamProjector:
        return StreamProjector(
            client,
            projections,
            list(tenants.tenants),
            group=settings.group,
            consumer=settings.consumer or socket.gethostname(),
            batch=batch,
            block_ms=settings.block_ms,
            linger_ms=linger_ms,
            claim_idle_s=settings.claim_idle_s,
            max_deliveries=settings.max_deliveries,
            consumer_idle_s=settings.consumer_idle_s,
            stream=stream,
            stream_name=name,
        )

    projector = reader(keys.events, "events", settings.batch, settings.linger_ms)
    catalog = reader(keys.catalog_events, "catalog", CATALOG_BATCH)

    retention = Retention(
        client,
        {t.name: t.retention_days for t in tenants.tenants.values() if t.retention_days},
        group=settings.group,
        half_life_s=settings.half_life_s,
        history_cap=settings.history_cap,
        every_s=settings.retention_every_s,
    )

    async def reading() -> None:
        for stream in (projector, catalog):
            if not stream.progressing(within_s=STALL_S):
                raise RuntimeError(
                    f"no successful read of the {stream.stream_name} stream in {STALL_S:g} s"
                )

    return Service(
        [],
        checks=[mesh_redis.redis_check(client), HealthCheck("projector", reading)],
        startups=[projector.start, catalog.start, retention.start],
        cleanups=[retention.stop, catalog.stop, projector.stop, client.aclose],
    )
