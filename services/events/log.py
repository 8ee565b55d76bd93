"""The event log on Redis Streams.

Each tenant has one stream ``rm:{t}:events``. A batch is appended by one Lua script
call that, for each event in order, first claims ``rm:{t}:eid:<event_id>`` with ``SET NX
EX``; a second append of the same id finds the claim and stores nothing, so retries from
the gateway's outbox are harmless (at-least-once delivery, exactly-once effect within the
dedupe window). Every key of a batch carries the tenant's hash tag, so one script call
touches one cluster slot.
Entries hold the serialized ``recmesh.events.v1.Event`` under the field ``e``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from recmesh.events.v1 import events_pb2

_APPEND = """
local appended = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
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


class RedisStreamEventLog(EventLog):
    """:class:`EventLog` on Redis Streams.

    Args:
        client: asyncio Redis client (bytes responses).
        dedupe_ttl_s: how long an event id is remembered.
    """

    def __init__(self, client: aioredis.Redis, dedupe_ttl_s: int) -> None:
        self._redis = client
        self._append = client.register_script(_APPEND)
        self._ttl = dedupe_ttl_s

    async def prepare(self) -> None:
        """Load the append script into Redis now, so the first append is one round trip."""
        await self._redis.script_load(_APPEND)

    @staticmethod
    def stream_key(tenant: str) -> str:
        return f"rm:{{{tenant}}}:events"

    async def append(self, tenant: str, events: Sequence[events_pb2.Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        appended = int(
            await self._append(
                keys=[
                    self.stream_key(tenant),
                    *(f"rm:{{{tenant}}}:eid:{event.event_id}" for event in events),
                ],
                args=[self._ttl, *(event.SerializeToString() for event in events)],
            )
        )
        return AppendResult(appended, len(events) - appended)

    async def read(self, tenant: str, after: str, limit: int) -> list[tuple[str, events_pb2.Event]]:
        start = f"({after}" if after else "-"
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self._redis.xrange(self.stream_key(tenant), min=start, count=limit),
        )
        return [
            (position.decode(), events_pb2.Event.FromString(fields[b"e"]))
            for position, fields in entries
        ]
