"""The event log on Redis Streams.

Each tenant has one stream ``rm:{t}:events``. A batch is appended by one Lua script
call that, for each event in order, first claims ``rm:{t}:eid:<event_id>`` with ``SET NX
EX``; a second append of the same id finds the claim and stores nothing, so retries from
the gateway's outbox are harmless (at-least-once delivery, exactly-once effect within the
dedupe window). Every key of a batch carries the tenant's hash tag, so one script call
touches one cluster slot.
Entries hold the serialized ``recmesh.events.v1.Event`` under the field ``e``.

An event that names a request (``request_id``) also has its stream position appended to
``rm:{t}:rq:<request_id>`` in the same script call: a list of at most ``request_cap``
positions (the first ones: the answer's impressions, then its outcomes), which expires
one dedupe window after the request's first event (later events do not extend it). The
events of one request (its impressions with their lineage, and the clicks and conversions
that name it) are read back without scanning the stream (:meth:`EventLog.read_request`,
``recmesh explain``).

A catalog event (``item_upsert``, ``item_delete``) is also copied, in the same call, to
the tenant's catalog stream ``rm:{t}:events:cat`` (capped at about
:data:`CATALOG_STREAM_CAP` entries), which the projector reads ahead of the log so that
catalog changes never wait behind impressions (:mod:`services.projector.consumer`).

Every event also has its position added to its user's index ``rm:{t}:ue:<user_id>`` (a
sorted set scored by the append time, ms) in the same call, so a user's events up to a
time are read back in log order without scanning the stream (:meth:`EventLog.read_user`,
the feature service's as-of reads). The append time decides what "up to a time" means,
not the event's own ``ts_ms``: an event appended after the time is left out, whatever
time its client gave it, so nothing that was not yet in the log at that time leaks in.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from recmesh.events.v1 import events_pb2

from core import keys
from core.catalog import CATALOG_TYPES, LIVE_BASE, set_item
from core.logread import as_text, position_order
from mesh.redis import AsyncRedis

# KEYS: the stream, the catalog stream, then per event its dedupe claim, then per event its
# request index, then per event its user's index.
# ARGV: the dedupe TTL, the request index's cap, the catalog stream's cap, then per event
# its serialized form, then per event "1" when it names a request, then per event "1" when
# it names a user, then per event "1" when it is a catalog event.
_APPEND = """
local n = (#KEYS - 2) / 3
local appended = 0
for i = 1, n do
  if redis.call('SET', KEYS[2 + i], '1', 'NX', 'EX', ARGV[1]) then
    local position = redis.call('XADD', KEYS[1], '*', 'e', ARGV[3 + i])
    if ARGV[3 + 3 * n + i] == '1' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[3 + i])
    end
    if ARGV[3 + 2 * n + i] == '1' then
      redis.call('ZADD', KEYS[2 + 2 * n + i], string.match(position, '^%d+'), position)
    end
    local index = KEYS[2 + n + i]
    if ARGV[3 + n + i] == '1' and redis.call('LLEN', index) < tonumber(ARGV[2]) then
      redis.call('RPUSH', index, position)
      redis.call('EXPIRE', index, ARGV[1], 'NX')
    end
    appended = appended + 1
  end
end
return appended
"""

CATALOG_STREAM_CAP = 100_000
"""About how many entries the catalog stream keeps (``XADD MAXLEN ~``): far more than the
projector ever trails it by; an entry trimmed unread is still applied from the log."""

# KEYS: the tenant's id map (external -> internal), its reverse, its counter.
# ARGV: the first internal id of the tenant's range, then the external ids to resolve.
# Returns each one's internal id (decimal), handing out the next of the range to a new one.
_RESOLVE = """
local ids = {}
for i = 2, #ARGV do
  local id = redis.call('HGET', KEYS[1], ARGV[i])
  if not id then
    id = string.format('%d', tonumber(ARGV[1]) + redis.call('INCR', KEYS[3]) - 1)
    redis.call('HSET', KEYS[1], ARGV[i], id)
    redis.call('HSET', KEYS[2], id, ARGV[i])
  end
  ids[#ids + 1] = id
end
return ids
"""


@dataclass(frozen=True)
class AppendResult:
    appended: int
    duplicates: int


@dataclass(frozen=True)
class UserEvents:
    """A page of one user's stored events (:meth:`EventLog.read_user`)."""

    events: list[tuple[str, events_pb2.Event]]
    """Position and event, in log order."""
    next_after: str
    """The position the next page starts after; "" when this page reached the time asked."""
    horizon_ms: int
    """When entries were ever removed from the tenant's log (retention, erasure), the
    append time (ms) of the oldest one it still holds (after the newest it ever held when it
    holds none); 0 while it holds every event appended to it."""


class EventLog(abc.ABC):
    """An append-only, per-tenant event log with idempotent appends."""

    @abc.abstractmethod
    async def append(self, tenant: str, events: Sequence[events_pb2.Event]) -> AppendResult:
        """Store events whose id was not seen before, in order."""

    @abc.abstractmethod
    async def resolve_items(self, tenant: str, events: Sequence[events_pb2.Event]) -> None:
        """Set the internal ``item_id`` of every event that names an item by its external id
        (``item_ref``; :mod:`core.catalog`), handing out new ids to ids never seen."""

    @abc.abstractmethod
    async def read(self, tenant: str, after: str, limit: int) -> list[tuple[str, events_pb2.Event]]:
        """Up to ``limit`` entries after position ``after`` ("" = from the start)."""

    @abc.abstractmethod
    async def read_request(
        self, tenant: str, request_id: str, limit: int
    ) -> list[tuple[str, events_pb2.Event]]:
        """Up to ``limit`` stored events of ``tenant`` that name ``request_id``, in log
        order (none once the request is older than the dedupe window)."""

    @abc.abstractmethod
    async def read_user(
        self, tenant: str, user_id: str, until_ms: int, limit: int, after: str = ""
    ) -> UserEvents:
        """Up to ``limit`` (>= 1) stored events of ``user_id`` appended at or before
        ``until_ms``, after position ``after`` ("" = from the start), in log order, with
        where the next page starts and the log's horizon. Events removed from the log since
        they were appended (retention, erasure) are skipped and leave the user's index."""


class RedisStreamEventLog(EventLog):
    """:class:`EventLog` on Redis Streams.

    Args:
        client: asyncio Redis client (bytes responses).
        dedupe_ttl_s: how long an event id is remembered.
        request_cap: most events indexed per request (a client that names one request id
            on every event cannot grow its index without bound).
    """

    def __init__(self, client: AsyncRedis, dedupe_ttl_s: int, request_cap: int = 1000) -> None:
        self._redis = client
        self._append = client.register_script(_APPEND)
        self._resolve = client.register_script(_RESOLVE)
        self._ttl = dedupe_ttl_s
        self._request_cap = request_cap

    async def prepare(self) -> None:
        """Load the append script into Redis now, so the first append is one round trip."""
        await self._redis.script_load(_APPEND)
        await self._redis.script_load(_RESOLVE)

    async def resolve_items(self, tenant: str, events: Sequence[events_pb2.Event]) -> None:
        live: dict[str, list[events_pb2.Event]] = {}
        for event in events:
            if not event.item_ref:
                continue
            number = set_item(event.item_ref)
            if number is None:
                live.setdefault(event.item_ref, []).append(event)
            else:
                event.item_id = number
        if not live:
            return
        refs = list(live)
        ids = cast(
            list[bytes],
            await self._resolve(
                keys=[keys.item_ids(tenant), keys.item_names(tenant), keys.item_next(tenant)],
                args=[LIVE_BASE, *refs],
            ),
        )
        for ref, raw in zip(refs, ids, strict=True):
            for event in live[ref]:
                event.item_id = int(raw)

    async def append(self, tenant: str, events: Sequence[events_pb2.Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        appended = int(
            await self._append(
                keys=[
                    keys.events(tenant),
                    keys.catalog_events(tenant),
                    *(keys.event_claim(tenant, event.event_id) for event in events),
                    *(keys.request_events(tenant, event.request_id) for event in events),
                    *(keys.user_events(tenant, event.user_id) for event in events),
                ],
                args=[
                    self._ttl,
                    self._request_cap,
                    CATALOG_STREAM_CAP,
                    *(event.SerializeToString() for event in events),
                    *("1" if event.request_id else "0" for event in events),
                    *("1" if event.user_id else "0" for event in events),
                    *("1" if event.type in CATALOG_TYPES else "0" for event in events),
                ],
            )
        )
        return AppendResult(appended, len(events) - appended)

    async def read(self, tenant: str, after: str, limit: int) -> list[tuple[str, events_pb2.Event]]:
        start = f"({after}" if after else "-"
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self._redis.xrange(keys.events(tenant), min=start, count=limit),
        )
        return _decoded(entries)

    async def read_request(
        self, tenant: str, request_id: str, limit: int
    ) -> list[tuple[str, events_pb2.Event]]:
        key = keys.request_events(tenant, request_id)
        positions = cast(list[bytes], await self._redis.lrange(key, 0, limit - 1))
        if not positions:
            return []
        stream = keys.events(tenant)
        async with self._redis.pipeline(transaction=False) as pipe:
            for position in positions:
                pipe.xrange(stream, min=position, max=position)
            found = cast(list[list[tuple[bytes, dict[bytes, bytes]]]], await pipe.execute())
        # An entry trimmed from the stream since (retention) is simply gone.
        return _decoded([entry for entries in found for entry in entries])

    async def read_user(
        self, tenant: str, user_id: str, until_ms: int, limit: int, after: str = ""
    ) -> UserEvents:
        # The index orders members of one score (one millisecond) by their bytes, in which
        # "t-10" comes before "t-9": every millisecond a page touches is read whole and put
        # in stream order here, so a page boundary never falls by byte order.
        index, stream = keys.user_events(tenant, user_id), keys.events(tenant)
        start = position_order(after) if after else None
        async with self._redis.pipeline(transaction=False) as pipe:
            if start is not None:
                pipe.zrange(index, start[0], start[0], byscore=True)
            pipe.zrange(
                index,
                f"({start[0]}" if start is not None else "-inf",
                until_ms,
                byscore=True,
                offset=0,
                num=limit,
            )
            pipe.xinfo_stream(stream)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies[:-1]:
            if isinstance(reply, Exception):
                raise reply
        info = replies[-1]
        if isinstance(info, redis.ResponseError):
            info = None  # no stream yet: nothing appended, nothing removed
        elif isinstance(info, Exception):
            raise info
        same: list[str] = []
        if start is not None and start[0] <= until_ms:
            same = [p for p in _texts(replies[0]) if position_order(p) > start]
        later = _texts(replies[-2])
        full = len(later) == limit
        if full:
            last_ms = position_order(later[-1])[0]
            whole = cast(
                list[bytes], await self._redis.zrange(index, last_ms, last_ms, byscore=True)
            )
            later = [p for p in later if position_order(p)[0] < last_ms] + _texts(whole)
        candidates = sorted(same, key=position_order) + sorted(later, key=position_order)
        page = candidates[:limit]
        more = full or len(candidates) > limit
        found: list[list[tuple[bytes, dict[bytes, bytes]]]] = []
        if page:
            async with self._redis.pipeline(transaction=False) as pipe:
                for position in page:
                    pipe.xrange(stream, min=position, max=position)
                found = cast(list[list[tuple[bytes, dict[bytes, bytes]]]], await pipe.execute())
            gone = [p for p, entries in zip(page, found, strict=True) if not entries]
            if gone:
                await self._redis.zrem(index, *gone)
        return UserEvents(
            events=_decoded([entry for entries in found for entry in entries]),
            next_after=page[-1] if more and page else "",
            horizon_ms=_horizon(info),
        )


def _texts(members: list[bytes]) -> list[str]:
    return [member.decode() for member in members]


def _horizon(info: dict[str, Any] | None) -> int:
    """The horizon of a stream described by ``XINFO STREAM`` (see :class:`UserEvents`)."""
    if info is None or int(info.get("entries-added", 0)) <= int(info["length"]):
        return 0
    first = info.get("first-entry")
    if first:
        return position_order(as_text(first[0]))[0]
    return position_order(as_text(info["last-generated-id"]))[0] + 1


def _decoded(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[str, events_pb2.Event]]:
    return [
        (position.decode(), events_pb2.Event.FromString(fields[b"e"]))
        for position, fields in entries
    ]
