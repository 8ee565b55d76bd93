"""The event log on Redis Streams.

Each tenant has one stream ``rm:{t}:events``. An event is appended by a Lua script
that first claims ``rm:{t}:eid:<event_id>`` with ``SET NX EX``; a second append of the
same id finds the claim and stores nothing, so retries from the gateway's outbox are
harmless (at-least-once delivery, exactly-once effect within the dedupe window).
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
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[1], '*', 'e', ARGV[2])
end
return false
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
        stream = self.stream_key(tenant)
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                await self._append(
                    keys=[stream, f"rm:{{{tenant}}}:eid:{event.event_id}"],
                    args=[self._ttl, event.SerializeToString()],
                    client=pipe,
                )
            results = await pipe.execute()
        appended = sum(1 for r in results if r)
        return AppendResult(appended, len(results) - appended)

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
