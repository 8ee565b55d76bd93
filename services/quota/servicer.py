"""``recmesh.quota.v1.QuotaService``: tenant buckets from the tenant registry."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.context import current_tenant, validate_tenant
from mesh.errors import InvalidArgument, NotFound
from mesh.tenants import Tenant, Tenants
from services.quota.limiter import RedisRateLimiter

MAX_COST = 1000
MAX_BATCH_TENANTS = 1000
"""Most tenants one RecordUsage call may carry."""
MAX_COST_KEYS = 16
"""Most services (``cpu_us``) or stages (``candidates_scored``) one tenant's entry may name."""
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_COST_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    """Acquire units from a tenant's bucket; record what requests cost; report usage."""

    def __init__(self, limiter: RedisRateLimiter, tenants: Tenants) -> None:
        self._limiter = limiter
        self._tenants = tenants

    def _tenant(self, name: str) -> Tenant:
        tenant = self._tenants.get(validate_tenant(name, field="tenant"))
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
            next_unit_s=decision.seconds_until(decision.remaining + 1, tenant.rate, tenant.burst),
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
                quota_pb2.TenantUsage(
                    tenant=name,
                    allowed=usage.allowed,
                    rejected=usage.rejected,
                    candidates_scored=sum(usage.scored.values()),
                    candidates_scored_by_stage=usage.scored,
                    retrieval_cpu_ms=usage.cpu_us.get("retrieval", 0) / 1000,
                    ranking_cpu_ms=usage.cpu_us.get("ranking", 0) / 1000,
                    costed_requests=usage.costed,
                )
            )
        return quota_pb2.GetUsageResponse(usage=rows)

    async def RecordUsage(
        self, request: quota_pb2.RecordUsageRequest, context: Any
    ) -> quota_pb2.RecordUsageResponse:
        """Add each tenant's costs to its current hour, once per ``batch_id``; tenants
        not configured are left out (a tenant removed from the registry while a gateway
        still held its costs).

        Raises:
            InvalidArgument: a malformed ``batch_id``, more than MAX_BATCH_TENANTS entries, a
                tenant named twice or malformed, a negative figure, or a service or stage
                name that is not ``[a-z][a-z0-9_]*`` (at most 32 characters, at most
                MAX_COST_KEYS of them).
        """
        if not _BATCH_ID.fullmatch(request.batch_id):
            raise InvalidArgument(
                "batch_id must be 1 to 64 characters of [A-Za-z0-9_-]", field="batch_id"
            )
        if len(request.costs) > MAX_BATCH_TENANTS:
            raise InvalidArgument(f"at most {MAX_BATCH_TENANTS} tenants a batch", field="costs")
        seen: set[str] = set()
        known: list[quota_pb2.TenantCost] = []
        for cost in request.costs:
            name = validate_tenant(cost.tenant, field="costs.tenant")
            if name in seen:
                raise InvalidArgument(f"tenant {name!r} named twice", field="costs.tenant")
            seen.add(name)
            _check_cost(cost)
            if self._tenants.get(name) is not None:
                known.append(cost)
        added = await asyncio.gather(
            *(
                self._limiter.record(
                    f"tenant:{cost.tenant}",
                    request.batch_id,
                    cost.requests,
                    dict(cost.cpu_us),
                    dict(cost.candidates_scored),
                )
                for cost in known
            )
        )
        return quota_pb2.RecordUsageResponse(added=sum(added))


def _check_cost(cost: quota_pb2.TenantCost) -> None:
    """Raises InvalidArgument for a negative figure or a bad service or stage name."""
    if cost.requests < 0:
        raise InvalidArgument("requests must not be negative", field="costs.requests")
    for name, figures in (("cpu_us", cost.cpu_us), ("candidates_scored", cost.candidates_scored)):
        if len(figures) > MAX_COST_KEYS:
            raise InvalidArgument(f"at most {MAX_COST_KEYS} keys", field=f"costs.{name}")
        for key, value in figures.items():
            if not _COST_KEY.fullmatch(key):
                raise InvalidArgument(f"{key!r} is not a valid key", field=f"costs.{name}")
            if value < 0:
                raise InvalidArgument("figures must not be negative", field=f"costs.{name}")
