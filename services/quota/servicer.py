"""``recmesh.quota.v1.QuotaService``: tenant buckets from the tenant registry."""

from __future__ import annotations

from typing import Any

from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.context import current_tenant, validate_tenant
from mesh.errors import InvalidArgument, NotFound
from mesh.tenants import Tenant, TenantRegistry
from services.quota.limiter import RedisRateLimiter

MAX_COST = 1000


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    """Acquire units from a tenant's bucket; report usage."""

    def __init__(self, limiter: RedisRateLimiter, tenants: TenantRegistry) -> None:
        self._limiter = limiter
        self._tenants = tenants

    def _tenant(self, name: str) -> Tenant:
        tenant = self._tenants.get(validate_tenant(name))
        if tenant is None:
            raise NotFound(f"tenant {name!r} is not configured", field="tenant")
        return tenant

    async def Acquire(
        self, request: quota_pb2.AcquireRequest, context: Any
    ) -> quota_pb2.AcquireResponse:
        """Take ``cost`` units, or as a lease up to ``max_cost``; with ``check_only``, say
        whether ``cost`` units are there without taking any (see ``AcquireRequest``).

        Raises:
            NotFound: the tenant is not configured.
            InvalidArgument: ``cost`` outside 0..MAX_COST, ``max_cost`` neither 0 nor
                in cost..MAX_COST, or ``max_cost`` set with ``check_only``.
        """
        tenant = self._tenant(request.tenant or current_tenant())
        if not 0 <= request.cost <= MAX_COST:
            raise InvalidArgument(f"cost must be in 0..{MAX_COST}", field="cost")
        cost = request.cost or 1
        if request.max_cost and not cost <= request.max_cost <= MAX_COST:
            raise InvalidArgument(f"max_cost must be 0 or in {cost}..{MAX_COST}", field="max_cost")
        bucket = f"tenant:{tenant.name}"
        if request.check_only:
            if request.max_cost:
                raise InvalidArgument("max_cost must be 0 with check_only", field="max_cost")
            decision = await self._limiter.check(bucket, tenant.rate, tenant.burst, cost)
        else:
            decision = await self._limiter.acquire(
                bucket, tenant.rate, tenant.burst, cost, request.max_cost
            )
        return quota_pb2.AcquireResponse(
            allowed=decision.allowed,
            rate=tenant.rate,
            burst=tenant.burst,
            remaining=decision.remaining,
            retry_after_s=decision.retry_after_s,
            granted=decision.granted,
        )

    async def GetUsage(
        self, request: quota_pb2.GetUsageRequest, context: Any
    ) -> quota_pb2.GetUsageResponse:
        names = (
            [self._tenant(request.tenant).name] if request.tenant else list(self._tenants.tenants)
        )
        rows = []
        for name in names:
            usage = await self._limiter.usage(f"tenant:{name}")
            rows.append(
                quota_pb2.TenantUsage(tenant=name, allowed=usage.allowed, rejected=usage.rejected)
            )
        return quota_pb2.GetUsageResponse(usage=rows)
