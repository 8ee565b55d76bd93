"""A GCRA token bucket evaluated atomically inside Redis.

Every caller (each gateway replica, each Envoy) shares one bucket per tenant because
the state lives in Redis and the check-and-update runs as one Lua script using the
server's clock. The bucket holds ``burst`` units and refills at ``rate`` per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

_GCRA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local interval = 1 / rate
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + cost * interval
local allow_at = new_tat - tolerance
if allow_at > now then
  redis.call('HINCRBY', KEYS[2], 'rejected', 1)
  redis.call('EXPIRE', KEYS[2], 7200)
  local remaining = math.floor((tolerance - (tat - now)) / interval)
  return {0, tostring(allow_at - now), remaining}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(tolerance * 1000) + 1000)
redis.call('HINCRBY', KEYS[2], 'allowed', 1)
redis.call('EXPIRE', KEYS[2], 7200)
return {1, '0', math.floor((tolerance - (new_tat - now)) / interval)}
"""


@dataclass(frozen=True)
class Decision:
    """Outcome of one acquire: ``retry_after_s`` is 0 when allowed."""

    allowed: bool
    remaining: int
    retry_after_s: float


@dataclass(frozen=True)
class Usage:
    allowed: int
    rejected: int


class RedisRateLimiter:
    """Token buckets keyed by name (a tenant, or an Envoy descriptor).

    Args:
        client: asyncio Redis client.
        clock: wall clock used only to name the hourly usage bucket.
    """

    def __init__(self, client: aioredis.Redis, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._script = client.register_script(_GCRA)
        self._clock = clock

    async def prepare(self) -> None:
        """Load the script into Redis now, so the first decision is one round trip."""
        await self._redis.script_load(_GCRA)

    def _usage_key(self, bucket: str, hour: int | None = None) -> str:
        hour = int(self._clock() // 3600) if hour is None else hour
        return f"rm:{{{bucket}}}:usage:{hour}"

    async def acquire(self, bucket: str, rate: float, burst: int, cost: int = 1) -> Decision:
        """Take ``cost`` units from ``bucket`` if available; count the decision."""
        allowed, retry_after, remaining = await self._script(
            keys=[f"rm:{{{bucket}}}:gcra", self._usage_key(bucket)],
            args=[rate, burst, cost],
        )
        return Decision(bool(allowed), max(0, int(remaining)), float(retry_after))

    async def usage(self, bucket: str) -> Usage:
        """Decisions counted for ``bucket`` in the current hour."""
        counts = await self._redis.hgetall(self._usage_key(bucket))
        return Usage(int(counts.get(b"allowed", 0)), int(counts.get(b"rejected", 0)))
