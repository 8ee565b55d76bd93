"""Reading the projector's item counters and trending set, decayed to the time of the read.

The projector (``services.projector.projections``) keeps, per item, each kind's count with
exponential time decay as of the latest event time it saw (``core.keys.item_counters``:
fields ``<kind>`` and ``<kind>_at``), and the clicked items in a sorted set ordered by
:func:`core.replay.trending_score` (``core.keys.trending``). A reader wants them as of
*now*: :func:`core.replay.decayed` for a counter, ``exp(score - (now - EPOCH_MS) / tau)``
for a trending score (the click count decayed to ``now``; scores never need rewriting).

* Counters of many items are one ``EVAL`` (:func:`queue_counters`) that HMGETs every
  item's hash inside Valkey and answers one string of packed float64 (6 per item), which
  :func:`decode_counters` decays with one numpy expression: about 2 µs of Valkey time per
  item, and a fraction of the client time of pipelined ``HMGET`` decoded in Python (0.4
  against 1.0 ms for 50 items; ``python -m loadtest.item_counters``, figures in
  ``docs/events.md``).
* The trending items are one ``ZRANGE ... BYSCORE REV LIMIT`` (:func:`read_trending`).

Both take ``tau`` in ms (:func:`core.replay.tau_ms` of ``RECMESH_PROJECTOR_HALF_LIFE_S``,
the projector's own setting, so reader and writer decay alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from core import keys
from core.replay import COUNTED, EPOCH_MS
from mesh.redis import AsyncRedis

F64 = npt.NDArray[np.float64]

FIELDS: tuple[str, ...] = tuple(f for kind in COUNTED for f in (kind, f"{kind}_at"))
"""The hash fields read per item, in the packed order: each kind's count, then its time."""

# KEYS: the items' counter hashes. ARGV: the fields to read (FIELDS).
# Returns one string: per key, #ARGV little-endian float64 (0 for a missing field).
_COUNTERS = """
local format = '<' .. string.rep('d', #ARGV)
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], unpack(ARGV))
  for j = 1, #ARGV do v[j] = tonumber(v[j]) or 0 end
  out[i] = struct.pack(format, unpack(v))
end
return table.concat(out)
"""


@dataclass(frozen=True)
class Counters:
    """Decayed counts of a batch of items, parallel to the ids asked for (0: never counted)."""

    impressions: F64
    clicks: F64
    conversions: F64
    as_of_ms: int
    """The time every count is decayed to (ms since the epoch)."""

    @classmethod
    def empty(cls, as_of_ms: int) -> Counters:
        none = np.zeros(0, dtype=np.float64)
        return cls(none, none, none, as_of_ms)


@dataclass(frozen=True)
class Trending:
    """The tenant's trending items, most decayed clicks first, with those clicks."""

    item_ids: list[int]
    clicks: list[float]
    as_of_ms: int


def queue_counters(pipe: Any, tenant: str, item_ids: Sequence[int]) -> None:
    """Add the read of ``item_ids``' counters to ``pipe`` (a non-transactional pipeline)
    as one ``EVAL``; its reply goes to :func:`decode_counters`.

    ``EVAL`` and not ``EVALSHA``: in a pipeline redis-py's script objects ask ``SCRIPT
    EXISTS`` first, a second round trip; Valkey caches the compiled body by its digest.
    """
    names = [keys.item_counters(tenant, int(item)) for item in item_ids]
    pipe.eval(_COUNTERS, len(names), *names, *FIELDS)


def decode_counters(raw: bytes, n: int, now_ms: int, tau: float) -> Counters:
    """The reply of :func:`queue_counters` for ``n`` items, each count decayed to ``now_ms``
    as :func:`core.replay.decayed` does (a count is never read as of a time before its own).
    """
    packed = np.frombuffer(raw, dtype="<f8").reshape(n, len(FIELDS))
    values, times = packed[:, 0::2], packed[:, 1::2]
    now = values * np.exp(np.minimum(0.0, (times - now_ms) / tau))
    return Counters(
        np.ascontiguousarray(now[:, 0]),
        np.ascontiguousarray(now[:, 1]),
        np.ascontiguousarray(now[:, 2]),
        now_ms,
    )


async def read_trending(
    client: AsyncRedis, tenant: str, k: int, min_clicks: float, now_ms: int, tau: float
) -> Trending:
    """The ``k`` items of ``tenant``'s trending set with the most clicks decayed to
    ``now_ms``, leaving out those below ``min_clicks`` (one ``ZRANGE``)."""
    shift = (now_ms - EPOCH_MS) / tau
    floor = f"{math.log(min_clicks) + shift!r}" if min_clicks > 0 else "-inf"
    found = cast(
        list[tuple[bytes, float]],
        await client.zrange(
            keys.trending(tenant),
            "+inf",
            floor,
            desc=True,
            byscore=True,
            offset=0,
            num=k,
            withscores=True,
        ),
    )
    return Trending(
        [int(member) for member, _ in found],
        [math.exp(score - shift) for _, score in found],
        now_ms,
    )
