"""Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` on the tenant buckets.

A descriptor whose entries include ``tenant=<name>`` of a configured tenant is checked
against that tenant's bucket (the same bucket the gateway uses, so Envoy and the
gateway share one limit). Descriptors that match no limit are answered OK without a
``current_limit``, as Envoy's own service does for unconfigured descriptors.
"""

from __future__ import annotations

import math
from typing import Any

from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from mesh.errors import InvalidArgument
from mesh.tenants import TenantRegistry
from services.quota.limiter import RedisRateLimiter

MAX_DESCRIPTORS = 64
Response = rls_pb2.RateLimitResponse


class EnvoyRateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Answers ``ShouldRateLimit`` for one domain."""

    def __init__(self, limiter: RedisRateLimiter, tenants: TenantRegistry, domain: str) -> None:
        self._limiter = limiter
        self._tenants = tenants
        self._domain = domain

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Any
    ) -> rls_pb2.RateLimitResponse:
        if request.domain != self._domain:
            raise InvalidArgument(
                f"unknown rate-limit domain {request.domain!r}; this service answers "
                f"{self._domain!r}",
                field="domain",
            )
        if len(request.descriptors) > MAX_DESCRIPTORS:
            raise InvalidArgument(f"at most {MAX_DESCRIPTORS} descriptors", field="descriptors")
        statuses = []
        for descriptor in request.descriptors:
            entries = {entry.key: entry.value for entry in descriptor.entries}
            tenant = self._tenants.get(entries.get("tenant", ""))
            if tenant is None:
                statuses.append(Response.DescriptorStatus(code=Response.OK))
                continue
            hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else 0
            cost = int(hits or request.hits_addend or 1)
            decision = await self._limiter.acquire(
                f"tenant:{tenant.name}", tenant.rate, tenant.burst, cost
            )
            reset = duration_pb2.Duration()
            reset.FromNanoseconds(math.ceil(decision.retry_after_s * 1e9))
            statuses.append(
                Response.DescriptorStatus(
                    code=Response.OK if decision.allowed else Response.OVER_LIMIT,
                    current_limit=Response.RateLimit(
                        name=f"tenant:{tenant.name}",
                        requests_per_unit=max(1, round(tenant.rate)),
                        unit=Response.RateLimit.SECOND,
                    ),
                    limit_remaining=decision.remaining,
                    duration_until_reset=reset,
                )
            )
        over = any(s.code == Response.OVER_LIMIT for s in statuses)
        return Response(
            overall_code=Response.OVER_LIMIT if over else Response.OK, statuses=statuses
        )
