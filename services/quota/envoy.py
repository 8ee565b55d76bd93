"""Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` on the tenant buckets.

A descriptor whose entries include ``tenant=<name>`` of a configured tenant is checked
against that tenant's bucket (the same bucket the gateway uses, so Envoy and the
gateway share one limit). Descriptors that match no limit are answered OK without a
``current_limit``, as Envoy's reference service (envoyproxy/ratelimit) does.

The answers follow the reference field by field. It counts hits in fixed windows and this
service holds a token bucket, so docs/architecture.md ("Envoy's rate-limit API") says how
each field maps and why:

- Hits: a descriptor's ``hits_addend`` when set, 0 included (0 only checks: the status is
  reported and nothing is taken); otherwise the request's ``hits_addend``, at least 1.
- ``current_limit``: the tenant's rate as whole requests per unit (:func:`window_limit`).
- ``limit_remaining``: whole units left after the hit, at most ``requests_per_unit``;
  0 on OVER_LIMIT.
- ``duration_until_reset``: on every status with a limit, whole seconds (at least 1, at
  most one unit) until ``limit_remaining`` is back at its highest, whatever the hit's size.
  A denied hit, even one larger than the burst, takes nothing from the bucket.
- A domain other than this service's: every descriptor OK without a limit. An empty
  domain or no descriptors: INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from mesh.errors import InvalidArgument
from mesh.tenants import Tenants
from services.quota.limiter import RedisRateLimiter

MAX_DESCRIPTORS = 64
MAX_UINT32 = 2**32 - 1
Response = rls_pb2.RateLimitResponse
Unit = Response.RateLimit.Unit
_UNITS = ((Unit.SECOND, 1), (Unit.MINUTE, 60), (Unit.HOUR, 3600), (Unit.DAY, 86400))


@dataclass(frozen=True)
class WindowLimit:
    """A rate as Envoy's ``RateLimit``: ``requests_per_unit`` per ``unit`` (``unit_s`` seconds)."""

    requests_per_unit: int
    unit: rls_pb2.RateLimitResponse.RateLimit.Unit.ValueType
    unit_s: int


def window_limit(rate: float) -> WindowLimit:
    """``rate`` (units per second) as whole requests per Envoy unit.

    The smallest unit up to DAY in which ``rate`` is a whole number of at least 1 (0.5/s is
    30 per MINUTE); when none is, the rate rounded down in the smallest unit where it is at
    least 1 (never more than the tenant gets); below one a day, 1 per DAY.
    ``requests_per_unit`` is capped at the largest uint32.
    """
    for unit, seconds in _UNITS:
        count = rate * seconds
        if round(count) >= 1 and abs(count - round(count)) < 1e-6:
            return WindowLimit(min(round(count), MAX_UINT32), unit, seconds)
    for unit, seconds in _UNITS:
        if rate * seconds >= 1:
            return WindowLimit(min(math.floor(rate * seconds), MAX_UINT32), unit, seconds)
    return WindowLimit(1, Unit.DAY, 86400)


def hits_of(
    request: rls_pb2.RateLimitRequest, descriptor: ratelimit_pb2.RateLimitDescriptor
) -> int:
    """Hits ``descriptor`` adds: its own ``hits_addend`` when set (0 means check only),
    else the request's, where 0 (unset) means 1."""
    if descriptor.HasField("hits_addend"):
        return int(descriptor.hits_addend.value)
    return max(1, int(request.hits_addend))


class EnvoyRateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Answers ``ShouldRateLimit`` for one domain."""

    def __init__(self, limiter: RedisRateLimiter, tenants: Tenants, domain: str) -> None:
        self._limiter = limiter
        self._tenants = tenants
        self._domain = domain

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Any
    ) -> rls_pb2.RateLimitResponse:
        """One status per descriptor, in order; OVER_LIMIT overall when any status is.

        Raises:
            InvalidArgument: an empty ``domain``, no descriptors, or more than
                MAX_DESCRIPTORS of them.
        """
        if not request.domain:
            raise InvalidArgument("rate limit domain must not be empty", field="domain")
        if not request.descriptors:
            raise InvalidArgument(
                "rate limit descriptor list must not be empty", field="descriptors"
            )
        if len(request.descriptors) > MAX_DESCRIPTORS:
            raise InvalidArgument(f"at most {MAX_DESCRIPTORS} descriptors", field="descriptors")
        if request.domain != self._domain:
            # No limit is configured in another domain: OK without a limit, as the reference.
            return Response(
                overall_code=Response.OK,
                statuses=[Response.DescriptorStatus(code=Response.OK)] * len(request.descriptors),
            )
        statuses = [await self._status(request, d) for d in request.descriptors]
        over = any(s.code == Response.OVER_LIMIT for s in statuses)
        return Response(
            overall_code=Response.OVER_LIMIT if over else Response.OK, statuses=statuses
        )

    async def _status(
        self, request: rls_pb2.RateLimitRequest, descriptor: ratelimit_pb2.RateLimitDescriptor
    ) -> rls_pb2.RateLimitResponse.DescriptorStatus:
        entries = {entry.key: entry.value for entry in descriptor.entries}
        tenant = self._tenants.get(entries.get("tenant", ""))
        if tenant is None:
            return Response.DescriptorStatus(code=Response.OK)
        bucket = f"tenant:{tenant.name}"
        hits = hits_of(request, descriptor)
        if hits:
            decision = await self._limiter.acquire(bucket, tenant.rate, tenant.burst, hits)
        else:
            decision = await self._limiter.check(bucket, tenant.rate, tenant.burst, 0)
        limit = window_limit(tenant.rate)
        highest = min(limit.requests_per_unit, tenant.burst)
        until_highest = decision.seconds_until(highest, tenant.rate, tenant.burst)
        reset_s = min(limit.unit_s, max(1, math.ceil(until_highest - 1e-9)))
        return Response.DescriptorStatus(
            code=Response.OK if decision.allowed else Response.OVER_LIMIT,
            current_limit=Response.RateLimit(
                name=bucket, requests_per_unit=limit.requests_per_unit, unit=limit.unit
            ),
            limit_remaining=(
                min(decision.remaining, limit.requests_per_unit) if decision.allowed else 0
            ),
            duration_until_reset=duration_pb2.Duration(seconds=reset_s),
        )
