"""The projections the stream keeps, and how one event changes them: idempotently.

For each event of a batch, one Lua call first claims ``applied(tenant, event_id)`` with
``SET NX EX``; only the first delivery of an event changes anything, so a redelivered
entry (a crash between applying and acknowledging, a claimed pending entry) is harmless:
at-least-once delivery, exactly-once effect while the mark lives.

* **Recent outcomes** (``outcomes(tenant, user)``): a click or a conversion appends its
  item, newest last, trimmed to ``history_cap``. The feature store serves them after the
  materialised history (which materialisation replaces; these it never touches), so
  retrieval drops them as already seen and the models read them as the user's history.
* **Item counters** (``item_counters(tenant, item)``, a hash): impressions, clicks and
  conversions with exponential time decay. For each kind the hash holds the value as of
  the latest event time seen (``<kind>_at``, ms) ``v = sum(exp(-(at - t_i) / tau))``;
  an event at ``t`` later than ``at`` decays the value to ``t`` and adds 1, an earlier one
  adds ``exp(-(at - t) / tau)``. Event time, not processing time: the value depends only
  on which events were applied, not on their order or on when the projector ran, so a
  replay gives the same counters. ``tau = half_life / ln 2``.

Other event types (exposure, dismiss) are marked applied and change nothing yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import redis.asyncio as aioredis
from recmesh.events.v1 import events_pb2

from core import keys

COUNTED = ("impression", "click", "conversion")
"""Event types the item counters count."""

OUTCOMES = ("click", "conversion")
"""Event types appended to the user's recent outcomes."""

# KEYS per event: applied mark, user outcomes, item counters.
# ARGV: mark TTL, history cap, tau (ms), then per event: type, item id, event time (ms).
_APPLY = """
local ttl, cap, tau = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local applied = 0
for i = 1, #KEYS / 3 do
  local kind, item, ts = ARGV[1 + 3 * i], ARGV[2 + 3 * i], tonumber(ARGV[3 + 3 * i])
  if redis.call('SET', KEYS[3 * i - 2], '1', 'NX', 'EX', ttl) then
    if kind == 'click' or kind == 'conversion' then
      redis.call('RPUSH', KEYS[3 * i - 1], item)
      redis.call('LTRIM', KEYS[3 * i - 1], -cap, -1)
    end
    if kind == 'impression' or kind == 'click' or kind == 'conversion' then
      local key = KEYS[3 * i]
      local at = tonumber(redis.call('HGET', key, kind .. '_at'))
      local value = tonumber(redis.call('HGET', key, kind)) or 0
      if at == nil then
        value, at = 1, ts
      elseif ts >= at then
        value, at = value * math.exp((at - ts) / tau) + 1, ts
      else
        value = value + math.exp((ts - at) / tau)
      end
      redis.call('HSET', key, kind, string.format('%.17g', value), kind .. '_at',
        string.format('%d', at))
    end
    applied = applied + 1
  end
end
return applied
"""


class Projections:
    """Applies events of one tenant to its projections in Redis (see the module docstring).

    Args:
        client: asyncio Redis client.
        history_cap: items a user's recent outcomes keep.
        half_life_s: half-life of the item counters' decay.
        applied_ttl_s: how long an applied event id is remembered.
    """

    def __init__(
        self, client: aioredis.Redis, history_cap: int, half_life_s: float, applied_ttl_s: int
    ) -> None:
        self._apply = client.register_script(_APPLY)
        self._redis = client
        self._history_cap = history_cap
        self._tau_ms = half_life_s * 1000.0 / math.log(2)
        self._ttl = applied_ttl_s

    async def prepare(self) -> None:
        """Load the script into Redis now, so the first batch is one round trip."""
        await self._redis.script_load(_APPLY)

    async def apply(self, tenant: str, events: Sequence[events_pb2.Event]) -> int:
        """Apply ``events`` of ``tenant`` in order; returns how many were new (the others
        had been applied before and changed nothing)."""
        if not events:
            return 0
        key_list: list[str] = []
        args: list[str | float | int] = [self._ttl, self._history_cap, self._tau_ms]
        for event in events:
            key_list += [
                keys.applied(tenant, event.event_id),
                keys.outcomes(tenant, event.user_id),
                keys.item_counters(tenant, event.item_id),
            ]
            args += [event.type, event.item_id, event.ts_ms]
        return int(await self._apply(keys=key_list, args=args))

    async def item_counters(self, tenant: str, item_id: int) -> dict[str, float]:
        """The decayed counts of ``item_id`` as stored, by kind (as of each kind's latest
        event time), and those times (``<kind>_at``, ms)."""
        raw = cast(
            dict[bytes, bytes], await self._redis.hgetall(keys.item_counters(tenant, item_id))
        )
        return {k.decode(): float(v) for k, v in raw.items()}
