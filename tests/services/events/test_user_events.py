"""A user's events up to a time (``ReadUserEvents``), against a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core import keys
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.events.log import RedisStreamEventLog
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings


@pytest.fixture(scope="module")
async def events(redis_url: str) -> AsyncIterator[events_pb2_grpc.EventServiceAsyncStub]:
    server = await built_server(
        build_events, EventsSettings(port=0, redis_url=redis_url, max_read=50)
    )
    async with serving(server), channel_to(server) as channel:
        yield events_pb2_grpc.EventServiceStub(channel)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


def event(event_id: str, user: str = "u1", **overrides: object) -> events_pb2.Event:
    fields: dict[str, object] = {
        "event_id": event_id,
        "type": "click",
        "user_id": user,
        "item_id": 3,
        "ts_ms": int(time.time() * 1000),
    }
    fields.update(overrides)
    return events_pb2.Event(**fields)  # type: ignore[arg-type]


def tenant() -> str:
    return "ue" + uuid.uuid4().hex[:8]


async def read_all(
    stub: events_pb2_grpc.EventServiceAsyncStub, name: str, user: str, until_ms: int, limit: int
) -> tuple[list[str], list[int]]:
    """Every page of ``user``'s events up to ``until_ms``: the event ids, and the horizons."""
    ids: list[str] = []
    horizons: list[int] = []
    after = ""
    while True:
        page = await stub.ReadUserEvents(
            events_pb2.ReadUserEventsRequest(
                user_id=user, until_ms=until_ms, limit=limit, after=after
            ),
            metadata=tenant_metadata(name),
        )
        assert len(page.events) <= limit
        ids += [e.event.event_id for e in page.events]
        horizons.append(page.horizon_ms)
        if not page.next_after:
            return ids, horizons
        after = page.next_after


async def test_appended_events_are_indexed_per_user_and_read_in_log_order(
    events: events_pb2_grpc.EventServiceAsyncStub,
) -> None:
    name = tenant()
    batch = [event(f"e{i}", user="a" if i % 3 else "b", type="impression") for i in range(30)]
    await events.Append(events_pb2.AppendRequest(events=batch), metadata=tenant_metadata(name))
    again = await events.Append(  # a redelivery is not indexed twice
        events_pb2.AppendRequest(events=batch[:5]), metadata=tenant_metadata(name)
    )
    assert again.duplicates == 5
    expected = [e.event_id for e in batch if e.user_id == "a"]
    now = int(time.time() * 1000) + 1
    for limit in (1, 4, 7, 50):
        ids, horizons = await read_all(events, name, "a", now, limit)
        assert ids == expected
        assert set(horizons) == {0}  # nothing was ever removed from this log
    assert (await read_all(events, name, "nobody", now, 10))[0] == []
    assert (await read_all(events, tenant(), "a", now, 10))[0] == []  # another tenant's log


async def test_the_append_time_decides_not_the_event_time(
    events: events_pb2_grpc.EventServiceAsyncStub,
) -> None:
    name = tenant()
    await events.Append(
        events_pb2.AppendRequest(events=[event("first")]), metadata=tenant_metadata(name)
    )
    await asyncio.sleep(0.02)
    cut = int(time.time() * 1000)
    await asyncio.sleep(0.02)
    late = event("late", ts_ms=cut - 60_000)  # appended after the cut, dated a minute before
    await events.Append(events_pb2.AppendRequest(events=[late]), metadata=tenant_metadata(name))
    assert (await read_all(events, name, "u1", cut, 10))[0] == ["first"]
    assert (await read_all(events, name, "u1", 0, 10))[0] == ["first", "late"]  # 0 = now


async def test_a_page_boundary_inside_one_millisecond_keeps_stream_order(
    client: AsyncRedis,
) -> None:
    # The index sorts one millisecond's members by bytes ("7-10" before "7-9"); the log
    # reads each millisecond whole and returns stream order, whatever the page size.
    name = tenant()
    log = RedisStreamEventLog(client, dedupe_ttl_s=100)
    positions = [f"7-{seq}" for seq in range(12)] + ["8-0", "8-1", "9-0"]
    for n, position in enumerate(positions):
        await client.xadd(keys.events(name), {"e": event(f"x{n}").SerializeToString()}, id=position)
        await client.zadd(keys.user_events(name, "u1"), {position: int(position.split("-")[0])})
    for limit in (1, 2, 5, 10, 11, 12, 13, 100):
        read: list[str] = []
        after = ""
        while True:
            page = await log.read_user(name, "u1", until_ms=8, limit=limit, after=after)
            assert len(page.events) <= limit
            read += [position for position, _ in page.events]
            if not page.next_after:
                break
            after = page.next_after
        assert read == positions[:-1], limit  # 9-0 is after until_ms


async def test_trimmed_entries_are_skipped_left_out_of_the_index_and_set_the_horizon(
    events: events_pb2_grpc.EventServiceAsyncStub, client: AsyncRedis
) -> None:
    name = tenant()
    for n in range(4):
        await events.Append(
            events_pb2.AppendRequest(events=[event(f"e{n}")]), metadata=tenant_metadata(name)
        )
        await asyncio.sleep(0.005)
    stored = await events.Read(events_pb2.ReadRequest(), metadata=tenant_metadata(name))
    kept = stored.events[2].position
    assert await client.xtrim(keys.events(name), minid=kept, approximate=False) == 2
    ids, horizons = await read_all(events, name, "u1", 0, 10)
    assert ids == ["e2", "e3"]
    assert set(horizons) == {int(kept.split("-")[0])}
    assert await client.zcard(keys.user_events(name, "u1")) == 2
    # A page whose every entry was trimmed is empty and still says where the next one starts.
    await client.xtrim(keys.events(name), maxlen=0, approximate=False)
    page = await events.ReadUserEvents(
        events_pb2.ReadUserEventsRequest(user_id="u1", limit=1), metadata=tenant_metadata(name)
    )
    assert list(page.events) == [] and page.next_after == stored.events[2].position
    last_ms = int(stored.events[3].position.split("-")[0])
    assert page.horizon_ms == last_ms + 1  # every entry is gone: after the newest it held


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (events_pb2.ReadUserEventsRequest(user_id=""), "user_id"),
        (events_pb2.ReadUserEventsRequest(user_id="u" * 129), "user_id"),
        (events_pb2.ReadUserEventsRequest(user_id="u1", until_ms=-1), "until_ms"),
        (events_pb2.ReadUserEventsRequest(user_id="u1", limit=-1), "limit"),
        (events_pb2.ReadUserEventsRequest(user_id="u1", limit=51), "limit"),
        (events_pb2.ReadUserEventsRequest(user_id="u1", after="x-1"), "after"),
    ],
)
async def test_bad_user_reads_are_invalid_argument(
    events: events_pb2_grpc.EventServiceAsyncStub,
    request_: events_pb2.ReadUserEventsRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await events.ReadUserEvents(request_, metadata=tenant_metadata("demo"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", field) in tuple(error.value.trailing_metadata() or ())
