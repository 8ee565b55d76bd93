"""A GCRA token bucket evaluated atomically inside Redis.

Every caller (each gateway replica, each Envoy) shares one bucket per tenant because
the state lives in Redis and the check-and-update runs as one Lua script using the
server's clock. The bucket holds ``burst`` units and refills at ``rate`` per second.

A call either takes exactly ``cost`` units or, as a lease, as many as the bucket has up
to ``max_cost`` (at least ``cost``); the hourly usage counts units granted, so with leases
it counts units handed out to callers, whether they used them or not. A denied call takes
nothing. A check (``check``) answers the same question without taking anything or
counting usage.

The same hourly hash holds what the tenant's requests cost (:meth:`RedisRateLimiter.record`):
CPU microseconds per service, candidates scored per stage and the requests those figures
cover, added once per batch id (a batch sent again adds nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mesh.redis import AsyncRedis

# Returns {allowed, retry_after_s, remaining, granted, refill_s}; floats as strings
# because Redis truncates Lua numbers to integers. ARGV[5] = '1' checks without writing.
_GCRA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_cost = tonumber(ARGV[4])
local check = ARGV[5] == '1'
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local interval = 1 / rate
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local available = math.floor((tolerance - (tat - now)) / interval + 1e-9)
local retry_after = tostring(tat + cost * interval - tolerance - now)
if check then
  if available < cost then
    return {0, retry_after, available, 0, tostring(tat - now)}
  end
  return {1, '0', available, 0, tostring(tat - now)}
end
local grant = math.min(max_cost, available)
if grant < cost then
  redis.call('HINCRBY', KEYS[2], 'rejected', 1)
  redis.call('EXPIRE', KEYS[2], 7200)
  return {0, retry_after, available, 0, tostring(tat - now)}
end
local new_tat = tat + grant * interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(tolerance * 1000) + 1000)
redis.call('HINCRBY', KEYS[2], 'allowed', grant)
redis.call('EXPIRE', KEYS[2], 7200)
return {1, '0', available - grant, grant, tostring(new_tat - now)}
"""

# KEYS[1] the hourly usage hash, KEYS[2] the batch's marker; ARGV field, increment pairs.
# Adds nothing when the marker exists (the batch was added before); returns 1 when added.
_RECORD = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', 7200) then
  return 0
end
for i = 1, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], 7200)
return 1
"""

CPU_FIELD = "cpu_us:"
SCORED_FIELD = "scored:"
COSTED_FIELD = "costed_requests"
"""Fields of the usage hash that hold costs: ``cpu_us:<service>``, ``scored:<stage>``."""


@dataclass(frozen=True)
class Decision:
    """Outcome of one acquire or check.

    Attributes:
        allowed: at least ``cost`` units were taken (a check: were available).
        remaining: whole units left in the bucket after this call.
        retry_after_s: when denied, seconds until ``cost`` units are available; else 0.
        granted: units taken (``cost`` up to ``max_cost`` when allowed, 0 when denied
            and on a check).
        refill_s: seconds from this call until the bucket is full (``burst`` units)
            again if nothing else takes from it; 0 when it is full now.
    """

    allowed: bool
    remaining: int
    retry_after_s: float
    granted: int
    refill_s: float

    def seconds_until(self, units: int, rate: float, burst: int) -> float:
        """Seconds from this call until the bucket holds ``units`` (at most ``burst``)
        whole units, if nothing else takes from it; 0 when it holds them now."""
        return max(0.0, self.refill_s - (burst - min(units, burst)) / rate)


@dataclass(frozen=True)
class Usage:
    """One hour of a bucket: ``allowed`` units granted, ``rejected`` calls denied, and
    what its requests cost as recorded: CPU microseconds by service, candidates scored by
    stage, and the requests (``costed``) those figures cover."""

    allowed: int
    rejected: int
    cpu_us: Mapping[str, int] = field(default_factory=dict)
    scored: Mapping[str, int] = field(default_factory=dict)
    costed: int = 0


class RedisRateLimiter:
    """Token buckets keyed by name (a tenant, or an Envoy descriptor).

    Args:
        client: asyncio Redis client.
        clock: wall clock used only to name the hourly usage bucket.
    """

    def __init__(self, client: AsyncRedis, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._script = client.register_script(_GCRA)
        self._record = client.register_script(_RECORD)
        self._clock = clock

    async def prepare(self) -> None:
        """Load the script into Redis now, so the first decision is one round trip."""
        await self._redis.script_load(_GCRA)
        await self._redis.script_load(_RECORD)

    def _usage_key(self, bucket: str, hour: int | None = None) -> str:
        hour = int(self._clock() // 3600) if hour is None else hour
        return f"rm:{{{bucket}}}:usage:{hour}"

    async def _run(self, bucket: str, args: list[float | int]) -> Decision:
        allowed, retry_after, remaining, granted, refill = await self._script(
            keys=[f"rm:{{{bucket}}}:gcra", self._usage_key(bucket)], args=args
        )
        return Decision(
            bool(allowed), max(0, int(remaining)), float(retry_after), int(granted), float(refill)
        )

    async def acquire(
        self, bucket: str, rate: float, burst: int, cost: int = 1, max_cost: int = 0
    ) -> Decision:
        """Take units from ``bucket`` and count them in the hourly usage.

        With ``max_cost`` greater than ``cost`` the call is a lease: it takes as many units
        as the bucket has, at most ``max_cost``; otherwise exactly ``cost``. Either way it
        is denied (nothing taken, one rejection counted) when fewer than ``cost`` units are
        available. A ``cost`` of 0 is always allowed and takes nothing (unless a lease).
        """
        return await self._run(bucket, [rate, burst, cost, max(cost, max_cost), 0])

    async def check(self, bucket: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Whether ``cost`` units are available in ``bucket`` now, taking none.

        The answer is the one :meth:`acquire` would give for ``cost`` (``allowed``,
        ``retry_after_s``, ``refill_s``) except that ``remaining`` is the whole units in the
        bucket now (nothing was taken), ``granted`` is 0, the bucket is unchanged and
        nothing is counted in the usage. A ``cost`` of 0 is
        always allowed.
        """
        return await self._run(bucket, [rate, burst, cost, cost, 1])

    async def record(
        self,
        bucket: str,
        batch_id: str,
        requests: int,
        cpu_us: Mapping[str, int],
        scored: Mapping[str, int],
    ) -> bool:
        """Add the cost of ``requests`` requests to ``bucket``'s current hour: CPU
        microseconds by service, candidates scored by stage; at most once per
        ``batch_id`` (remembered two hours). Whether it was added now."""
        pairs: list[str | int] = [COSTED_FIELD, requests]
        for name, value in cpu_us.items():
            pairs += [CPU_FIELD + name, value]
        for name, value in scored.items():
            pairs += [SCORED_FIELD + name, value]
        added = await self._record(
            keys=[self._usage_key(bucket), f"rm:{{{bucket}}}:usage-batch:{batch_id}"], args=pairs
        )
        return bool(added)

    async def usage(self, bucket: str) -> Usage:
        """Units granted, calls denied and the recorded costs of ``bucket`` in the current
        hour."""
        counts = await self._redis.hgetall(self._usage_key(bucket))
        fields = {
            key.decode() if isinstance(key, bytes) else key: int(value)
            for key, value in counts.items()
        }
        return Usage(
            fields.get("allowed", 0),
            fields.get("rejected", 0),
            {k[len(CPU_FIELD) :]: v for k, v in fields.items() if k.startswith(CPU_FIELD)},
            {k[len(SCORED_FIELD) :]: v for k, v in fields.items() if k.startswith(SCORED_FIELD)},
            fields.get(COSTED_FIELD, 0),
        )
