"""Composition root of the projector."""

from __future__ import annotations

import os
import socket

from mesh import redis as mesh_redis
from mesh.health import HealthCheck
from mesh.service import Service
from mesh.tenants import load_tenants
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections
from services.projector.settings import ProjectorSettings


async def build_service(settings: ProjectorSettings) -> Service:
    """The projector of every tenant in ``settings.tenants``: no gRPC API of its own, a
    health service that is SERVING while Redis answers and its loops run, and
    ``/metrics`` (lag, events handled).

    Raises:
        ConfigError: the tenant file is missing or invalid, or ``REDIS_URL`` is not set.
    """
    tenants = load_tenants(settings.tenants)
    client = mesh_redis.connect(settings.redis_url)
    projector = StreamProjector(
        client,
        Projections(client, settings.history_cap, settings.half_life_s, settings.applied_ttl_s),
        list(tenants.tenants),
        group=settings.group,
        consumer=settings.consumer or f"{socket.gethostname()}-{os.getpid()}",
        batch=settings.batch,
        block_ms=settings.block_ms,
        claim_idle_s=settings.claim_idle_s,
    )

    async def loops_running() -> None:
        if not projector.running:
            raise RuntimeError("the projector's loops are not running")

    return Service(
        [],
        checks=[mesh_redis.redis_check(client), HealthCheck("projector", loops_running)],
        startups=[projector.start],
        cleanups=[projector.stop, client.aclose],
    )
