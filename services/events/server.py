"""Composition root of the events service."""

from __future__ import annotations

from recmesh.events.v1 import events_pb2, events_pb2_grpc

from mesh import redis as mesh_redis
from mesh.service import Registration, Service
from services.events.erasure import Eraser
from services.events.log import RedisStreamEventLog
from services.events.servicer import EventServicer
from services.events.settings import EventsSettings


async def build_service(settings: EventsSettings) -> Service:
    """The events service writing to Redis at ``settings.redis_url``."""
    client = mesh_redis.connect(settings.redis_url)
    log = RedisStreamEventLog(client, settings.dedupe_ttl_s, request_cap=settings.max_read)
    eraser = Eraser(client, settings.half_life_s, settings.projector_group)
    servicer = EventServicer(log, settings.max_read, eraser=eraser)
    return Service(
        [Registration.of(servicer, events_pb2, events_pb2_grpc, "EventService")],
        checks=[mesh_redis.redis_check(client)],
        startups=[log.prepare],
        drains=[servicer.finish_erasures],
        cleanups=[client.aclose],
    )
