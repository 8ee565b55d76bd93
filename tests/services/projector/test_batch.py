"""Batch equals stream: the projections recomputed from a tenant's whole log equal those
the projector kept while reading it, and a difference is reported."""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from recmesh.events.v1 import events_pb2

from core import keys
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from ops import cli
from services.projector import batch
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections

HOUR_MS = 3_600_000
CAP = 3
CATEGORIES = {1: 4, 2: 7}


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


def event(event_id: str, kind: str, user: str, item: int, ts_ms: int) -> events_pb2.Event:
    return events_pb2.Event(event_id=event_id, type=kind, user_id=user, item_id=item, ts_ms=ts_ms)


async def projected_log(client: AsyncRedis) -> str:
    """A tenant whose varied log the projector has read to the end."""
    name = "bt" + uuid.uuid4().hex[:8]
    reader = StreamProjector(
        client,
        Projections(client, history_cap=CAP, half_life_s=3600.0, applied_ttl_s=600),
        [name],
        group="projector",
        consumer="test",
    )
    await reader.prepare()
    for item, category in CATEGORIES.items():  # items 0, 3 and 4 have no feature row
        await client.set(keys.item_row(name, item), struct.pack("<fi", 0.5, category))
    now = int(time.time() * 1000)
    log = [
        event("e1", "impression", "a", 1, now - 2 * HOUR_MS),
        event("e2", "click", "a", 1, now - HOUR_MS),
        event("e3", "impression", "a", 1, now - 3 * HOUR_MS),  # arrives out of order
        event("e2", "click", "a", 1, now - HOUR_MS),  # the same id again
        event("e4", "conversion", "a", 1, now),
        event("e5", "click", "a", 2, now + 6 * HOUR_MS),  # a client clock running fast
        *(event(f"c{n}", "click", "b", n, now + n) for n in range(5)),  # past the cap
        event("e6", "exposure", "b", 0, now),
    ]
    for entry in log:
        await client.xadd(keys.events(name), {"e": entry.SerializeToString()})
    await client.xadd(keys.events(name), {"e": b"\x00 not an event"})
    while await reader.read_once():
        pass
    return name


async def test_a_recompute_from_the_log_equals_the_live_projections(
    client: AsyncRedis,
) -> None:
    name = await projected_log(client)
    recomputed = await batch.recompute(client, name, 3600.0, CAP)
    assert recomputed.outcomes == {"a": [1, 1, 2], "b": [2, 3, 4]}
    # a: a click and a conversion of item 1 (category 4), a click of 2 (7); b: clicks of
    # items 0 to 4, of which only 1 and 2 have a feature row
    assert recomputed.shares == {"a": {4: 2, 7: 1}, "b": {4: 1, 7: 1}}
    assert recomputed.counters[1]["impression"][0] == pytest.approx(1.5, rel=1e-12)
    live = await batch.read_projections(client, name)
    assert set(live.trending) == {1, 2, 0, 3, 4}
    assert batch.compare(batch.expected(recomputed, 3600.0), live, 3600.0) == []


async def test_a_live_projection_that_drifted_is_reported(client: AsyncRedis) -> None:
    name = await projected_log(client)
    await client.hset(keys.item_counters(name, 1), "click", "7")
    await client.rpush(keys.outcomes(name, "b"), "99")
    await client.hset(keys.category_shares(name, "c"), "4", "1")  # a user no event explains
    found = await batch.verify(client, [name], 3600.0, CAP)
    assert len(found[name]) == 3
    assert any(line.startswith("outcomes of b") for line in found[name])
    assert any(line.startswith("click count of item 1") for line in found[name])
    assert any(line.startswith("category shares of c") for line in found[name])


async def test_the_command_exits_non_zero_on_a_difference(
    client: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = await projected_log(client)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RECMESH_FEATURE_HISTORY_CAP", str(CAP))
    argv = ["projections", "verify", "--tenant", name]
    assert await asyncio.to_thread(cli.main, argv) == 0
    await client.lpop(keys.outcomes(name, "a"))
    assert await asyncio.to_thread(cli.main, argv) == 1
