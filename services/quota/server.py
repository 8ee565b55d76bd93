"""Composition root of the quota service (RecMesh quota API and Envoy's RLS v3)."""

from __future__ import annotations

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh import redis as mesh_redis
from mesh.service import Registration, Service
from mesh.tenants import LiveRegistry
from services.quota.envoy import EnvoyRateLimitServicer
from services.quota.limiter import RedisRateLimiter
from services.quota.servicer import QuotaServicer
from services.quota.settings import QuotaSettings


async def build_service(settings: QuotaSettings) -> Service:
    """The quota service; limits come from the tenant registry file, watched like the
    gateway's (``mesh.tenants.LiveRegistry``): a changed rate or burst applies to the next
    call, without a restart.

    Raises:
        ConfigError: the tenant file is missing or invalid.
    """
    tenants = LiveRegistry(settings.tenants, settings.tenants_poll_s)
    client = mesh_redis.connect(settings.redis_url)
    limiter = RedisRateLimiter(client)
    return Service(
        [
            Registration.of(
                QuotaServicer(limiter, tenants), quota_pb2, quota_pb2_grpc, "QuotaService"
            ),
            Registration.of(
                EnvoyRateLimitServicer(limiter, tenants, settings.rls_domain),
                rls_pb2,
                rls_pb2_grpc,
                "RateLimitService",
            ),
        ],
        checks=[mesh_redis.redis_check(client)],
        startups=[limiter.prepare, tenants.start],
        cleanups=[tenants.stop, client.aclose],
    )
