"""Reading a tenant's event log from Redis in pages: the one reader of the stream for
everything that runs over the log in one pass (the projector's batch recompute and
rebuilds, experiment reports). Entries decode with :func:`core.replay.stored_entry`.
(``training.log_data`` reads with the blocking client the training process uses, through
the same decoder.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from core import keys
from core.replay import Stored, stored_entry
from mesh.redis import AsyncRedis

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as Redis returns it: its position and fields."""


def position_order(position: str) -> tuple[int, int]:
    """A stream position as (ms, sequence), which sorts in log order (the text does not:
    ``…-10`` sorts before ``…-9``)."""
    millis, _, seq = position.partition("-")
    return int(millis), int(seq or 0)


def as_text(value: bytes | str) -> str:
    """A Redis reply field (bytes from a bytes client) as text."""
    return value.decode() if isinstance(value, bytes) else value


async def iter_entries(
    client: AsyncRedis, stream: str, after: str = "", until: str = "+", page: int = 1000
) -> AsyncIterator[list[Entry]]:
    """The raw entries of ``stream`` after position ``after`` ("" = from the start) up to
    ``until`` (inclusive), a page of ``XRANGE`` at a time, in order."""
    start = f"({after}" if after else "-"
    while True:
        chunk = cast(list[Entry], await client.xrange(stream, min=start, max=until, count=page))
        if chunk:
            yield chunk
        if len(chunk) < page:
            return
        start = f"({as_text(chunk[-1][0])}"


async def iter_log(
    client: AsyncRedis, tenant: str, after: str = "", until: str = "+", page: int = 1000
) -> AsyncIterator[list[Stored]]:
    """``tenant``'s log after position ``after`` ("" = from the start) up to ``until``
    (inclusive), a page at a time, in order, decoded (:func:`core.replay.stored_entry`)."""
    async for chunk in iter_entries(client, keys.events(tenant), after, until, page):
        yield [stored_entry(position, fields) for position, fields in chunk]


async def read_log(client: AsyncRedis, tenant: str) -> list[Stored]:
    """Every entry of ``tenant``'s log, in order."""
    return [entry async for entries in iter_log(client, tenant) for entry in entries]


async def dead_lettered(client: AsyncRedis, tenant: str) -> set[str]:
    """Log positions of the tenant's dead letters: entries the projector never applied
    (invalid ones, and valid ones it gave up on after its delivery cap), which a recompute
    therefore leaves out too."""
    found: set[str] = set()
    start = "-"
    while True:
        chunk = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await client.xrange(keys.dead_letters(tenant), min=start, count=1000),
        )
        found |= {fields[b"position"].decode() for _, fields in chunk if b"position" in fields}
        if len(chunk) < 1000:
            return found
        start = f"({chunk[-1][0].decode()}"
