"""The projections the stream keeps, and how one event changes them: idempotently.

The rules are those of :mod:`core.replay` (which applies them in memory for batch
recomputes, snapshots and as-of reads); here they run in Redis, one Lua call per batch.
For each event the call first claims ``applied(tenant, event_id)`` with ``SET NX EX``; only
the first delivery of an event changes anything, so a redelivered entry (a crash between
applying and acknowledging, a claimed pending entry) is harmless: at-least-once delivery,
exactly-once effect while the mark lives.

* **Recent outcomes** (``outcomes(tenant, user)``): a click or a conversion appends its
  item, newest last, trimmed to ``history_cap``. The feature store serves them after the
  materialised history (which materialisation replaces; these it never touches), so
  retrieval drops them as already seen and the models read them as the user's history.
* **Category shares** (``category_shares(tenant, user)``, a hash): a click or a conversion
  counts one for its item's category, read from the item's feature row (its last four
  bytes); an item without a row counts in no share, and the call reports it.
* **Item counters** (``item_counters(tenant, item)``, a hash): impressions, clicks and
  conversions with exponential time decay in event time. For each kind the hash holds the
  value as of the latest event time seen (``<kind>_at``, ms); a replay in any order gives
  the same counters. ``tau = half_life / ln 2``.
* **Trending** (``trending(tenant)``, a sorted set): a clicked item's score is
  :func:`core.replay.trending_score` of its click counter.

* **The catalog** (live namespace only): an ``item_upsert`` writes the item's feature row
  (features then its int32 category), adds it to or removes it from the tenant's withdrawn
  items (``withdrawn(tenant)``) by its availability, and records the change in
  ``item_changes(tenant)`` scored by Redis's clock (one clock for every writer); an
  ``item_delete`` withdraws the item and records the change (its counters and trending
  score stay, as the log's replay computes them; retrieval never serves a withdrawn item
  from any source). One
  tenant's events apply in log order, so for one item the later event wins. A rebuild's
  namespace leaves the catalog alone: it is not a projection a rebuild swaps in.

Every key is named in a namespace: the live one (``""``) or a rebuild's.
Other event types (exposure, dismiss) are marked applied and change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from google.protobuf.message import DecodeError
from recmesh.events.v1 import events_pb2

from core import keys
from core.events import validate_event
from core.logread import Entry
from core.replay import EPOCH_MS, TRENDING_KIND, appended_ms, tau_ms
from mesh.errors import InvalidArgument
from mesh.redis import AsyncRedis

# KEYS: the trending set, the withdrawn items, the item changes, then per event: applied
# mark, user outcomes, item counters, category shares, item feature row.
# ARGV: mark TTL, history cap, tau (ms), epoch (ms), the trending kind, "1" when catalog
# events change the catalog (the live namespace), then per event: type, item id, event
# time (ms), category, features (packed), "1" when available.
# Returns {applied, applied events whose item has no feature row, then the 1-based index
# of each event not applied because one of its keys holds another type}. Redis does not
# roll a failed script back, so the types are checked before anything of an event is
# written: an event is applied whole (and marked) or not at all.
_APPLY = """
local ttl, cap, tau, epoch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local trend_kind, catalog = ARGV[5], ARGV[6] == '1'
local expected = {'string', 'list', 'hash', 'hash', 'string'}
local function typed(key, want)
  local found = redis.call('TYPE', key).ok
  return found == 'none' or found == want
end
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local result = {0, 0}
local shared_ok = typed(KEYS[1], 'zset') and typed(KEYS[2], 'set') and typed(KEYS[3], 'zset')
for i = 1, (#KEYS - 3) / 5 do
  local k = 3 + 5 * (i - 1)
  local a = 1 + 6 * i
  local kind, item, ts = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local ok = shared_ok
  for j = 1, 5 do
    ok = ok and typed(KEYS[k + j], expected[j])
  end
  if not ok then
    result[#result + 1] = i
  elseif redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', ttl) then
    if kind == 'item_upsert' and catalog then
      redis.call('SET', KEYS[k + 5], ARGV[a + 4] .. struct.pack('<i4', tonumber(ARGV[a + 3])))
      if ARGV[a + 5] == '1' then
        redis.call('SREM', KEYS[2], item)
      else
        redis.call('SADD', KEYS[2], item)
      end
      redis.call('ZADD', KEYS[3], now, item)
    elseif kind == 'item_delete' and catalog then
      redis.call('SADD', KEYS[2], item)
      redis.call('ZADD', KEYS[3], now, item)
    end
    local tail = redis.call('GETRANGE', KEYS[k + 5], -4, -1)
    if #tail ~= 4 and kind ~= 'item_delete' then result[2] = result[2] + 1 end
    if kind == 'click' or kind == 'conversion' then
      redis.call('RPUSH', KEYS[k + 2], item)
      redis.call('LTRIM', KEYS[k + 2], -cap, -1)
      if #tail == 4 then
        redis.call('HINCRBY', KEYS[k + 4], tostring(struct.unpack('<i4', tail)), 1)
      end
    end
    if kind == 'impression' or kind == 'click' or kind == 'conversion' then
      local key = KEYS[k + 3]
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
      if kind == trend_kind then
        redis.call('ZADD', KEYS[1], string.format('%.17g', math.log(value) + (at - epoch) / tau),
          item)
      end
    end
    result[1] = result[1] + 1
  end
end
return result
"""


@dataclass(frozen=True)
class Dead:
    """An entry that cannot be applied: where it is, why, and its raw bytes."""

    position: str
    reason: str
    payload: bytes


def decoded(entries: Sequence[Entry]) -> tuple[list[tuple[str, events_pb2.Event]], list[Dead]]:
    """The events of ``entries`` that can be applied, with their positions, each judged
    as of its append time (not of whenever it is projected, so a replay accepts and
    rejects the same events),
    its time no later than its append time (a skewed client clock cannot freeze an item's
    decay); and the dead letters: entries that are not a valid ``Event``."""
    events: list[tuple[str, events_pb2.Event]] = []
    dead: list[Dead] = []
    for raw_position, fields in entries:
        position = raw_position.decode() if isinstance(raw_position, bytes) else raw_position
        appended = appended_ms(position)
        payload = fields.get(b"e", b"")
        try:
            event = events_pb2.Event.FromString(payload)
            validate_event(event, 0, appended)
        except DecodeError as exc:
            dead.append(Dead(position, f"not an Event: {exc}", payload))
            continue
        except InvalidArgument as exc:
            dead.append(Dead(position, f"{exc.field}: {exc.message}", payload))
            continue
        event.ts_ms = min(event.ts_ms, appended)
        events.append((position, event))
    return events, dead


@dataclass(frozen=True)
class Applied:
    """What one :meth:`Projections.apply` changed."""

    applied: int
    """Events applied now (the others had been applied before and changed nothing)."""
    unknown_items: int
    """Applied events whose item has no feature row (no category: in no share)."""
    failed: tuple[int, ...] = ()
    """Indexes (0-based) of the events not applied at all because one of their keys holds
    another type of value (written by something else): they are left to be retried."""


class Projections:
    """Applies events of one tenant to its projections in Redis (see the module docstring).

    Args:
        client: asyncio Redis client.
        history_cap: items a user's recent outcomes keep.
        half_life_s: half-life of the item counters' decay.
        applied_ttl_s: how long an applied event id is remembered.
        namespace: where the projections are written: ``""`` for the live ones, a name
            for a rebuild's (:func:`core.keys.projection_prefix`).
    """

    def __init__(
        self,
        client: AsyncRedis,
        history_cap: int,
        half_life_s: float,
        applied_ttl_s: int,
        namespace: str = "",
    ) -> None:
        self._apply = client.register_script(_APPLY)
        self._redis = client
        self._history_cap = history_cap
        self._tau_ms = tau_ms(half_life_s)
        self._ttl = applied_ttl_s
        self.namespace = namespace

    async def prepare(self) -> None:
        """Load the script into Redis now, so the first batch is one round trip."""
        await self._redis.script_load(_APPLY)

    async def apply(self, tenant: str, events: Sequence[events_pb2.Event]) -> Applied:
        """Apply ``events`` of ``tenant`` in order (their times already no later than
        their append times)."""
        if not events:
            return Applied(0, 0)
        ns = self.namespace
        key_list: list[str] = [
            keys.trending(tenant, ns),
            keys.withdrawn(tenant),
            keys.item_changes(tenant),
        ]
        args: list[str | float | int | bytes] = [
            self._ttl,
            self._history_cap,
            self._tau_ms,
            EPOCH_MS,
            TRENDING_KIND,
            "0" if ns else "1",
        ]
        for event in events:
            key_list += [
                keys.applied(tenant, event.event_id, ns),
                keys.outcomes(tenant, event.user_id, ns),
                keys.item_counters(tenant, event.item_id, ns),
                keys.category_shares(tenant, event.user_id, ns),
                keys.item_row(tenant, event.item_id),
            ]
            args += [
                event.type,
                event.item_id,
                event.ts_ms,
                event.category,
                event.features,
                "1" if event.available else "0",
            ]
        applied, unknown, *failed = cast(list[int], await self._apply(keys=key_list, args=args))
        return Applied(int(applied), int(unknown), tuple(int(i) - 1 for i in failed))

    async def item_counters(self, tenant: str, item_id: int) -> dict[str, float]:
        """The decayed counts of ``item_id`` as stored, by kind (as of each kind's latest
        event time), and those times (``<kind>_at``, ms)."""
        raw = cast(
            dict[bytes, bytes],
            await self._redis.hgetall(keys.item_counters(tenant, item_id, self.namespace)),
        )
        return {k.decode(): float(v) for k, v in raw.items()}
