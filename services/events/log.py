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
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from recmesh.events.v1 import events_pb2

from core import keys

# KEYS: the stream, then per event its dedupe claim and its request index.
# ARGV: the dedupe TTL, the request index's cap, then per event its serialized form, then
# per event "1" when it names a request.
_APPEND = """
local n = (#KEYS - 1) / 2
local appended = 0
for i = 1, n do
  if redis.call('SET', KEYS[1 + i], '1', 'NX', 'EX', ARGV[1]) then
    local position = redis.call('XADD', KEYS[1], '*', 'e', ARGV[2 + i])
    local index = KEYS[1 + n + i]
    if ARGV[2 + n + i] == '1' and redis.call('LLEN', index) < tonumber(ARGV[2]) then
      redis.call('RPUSH', index, position)
      redis.call('EXPIRE', index, ARGV[1], 'NX')
    end
    appended = appended + 1
  end
end
return appended
"""


@dataclass(frozen=True)
class AppendResult:
    appended: int
    duplicates: int


class EventLog(abc.ABC):
    """An append-only, per-tenant event log with idempotent appends."""

    @abc.abstractmethod
    async def append(self, tenant: str, events: Sequence[events_pb2.Event]) -> AppendResult:
        """Store events whose id was not seen before, in order."""

    @abc.abstractmethod
    async def read(self, tenant: str, after: str, limit: int) -> list[tuple[str, events_pb2.Event]]:
        """Up to ``limit`` entries after position ``after`` ("" = from the start)."""

    @abc.abstractmethod
    async def read_request(
        self, tenant: str, request_id: str, limit: int
    ) -> list[tuple[str, events_pb2.Event]]:
        """Up to ``limit`` stored events of ``tenant`` that name ``request_id``, in log
        order (none once the request is older than the dedupe window)."""


class RedisStreamEventLog(EventLog):
    """:class:`EventLog` on Redis Streams.

    Args:
        client: asyncio Redis client (bytes responses).
        dedupe_ttl_s: how long an event id is remembered.
        request_cap: most events indexed per request (a client that names one request id
            on every event cannot grow its index without bound).
    """

    def __init__(self, client: aioredis.Redis, dedupe_ttl_s: int, request_cap: int = 1000) -> None:
        self._redis = client
        self._append = client.register_script(_APPEND)
        self._ttl = dedupe_ttl_s
        self._request_cap = request_cap

    async def prepare(self) -> None:
        """Load the append script into Redis now, so the first append is one round trip."""
        await self._redis.script_load(_APPEND)

    async def append(self, tenant: str, events: Sequence[events_pb2.Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        appended = int(
            await self._append(
                keys=[
                    keys.events(tenant),
                    *(keys.event_claim(tenant, event.event_id) for event in events),
                    *(keys.request_events(tenant, event.request_id) for event in events),
                ],
                args=[
                    self._ttl,
                    self._request_cap,
                    *(event.SerializeToString() for event in events),
                    *("1" if event.request_id else "0" for event in events),
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


def _decoded(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[tuple[str, events_pb2.Event]]:
    return [
        (position.decode(), events_pb2.Event.FromString(fields[b"e"]))
        for position, fields in entries
    ]
