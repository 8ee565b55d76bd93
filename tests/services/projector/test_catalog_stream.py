"""The catalog stream: catalog events are applied ahead of a log that trails impressions,
once, and in log order whichever reader reaches them first."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
from recmesh.events.v1 import events_pb2

from core import keys
from core.catalog import delete_event, upsert_event
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from services.events.log import RedisStreamEventLog
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections

WIDTH = 4


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


def readers(client: AsyncRedis, tenant: str) -> tuple[StreamProjector, StreamProjector]:
    """The projector's two readers of ``tenant``: the log's and the catalog stream's."""
    projections = Projections(client, history_cap=3, half_life_s=3600.0, applied_ttl_s=600)

    def reader(stream: str) -> StreamProjector:
        return StreamProjector(
            client,
            projections,
            [tenant],
            group="projector",
            consumer="c1",
            batch=1000,
            block_ms=0,
            stream=keys.catalog_events if stream == "catalog" else keys.events,
            stream_name=stream,
        )

    return reader("events"), reader("catalog")


def upsert(ref: str, available: bool = True) -> events_pb2.Event:
    features = b"\x00" * 4 * WIDTH
    return upsert_event(ref, 3, features, {}, available, int(time.time() * 1000))


async def withdrawn(client: AsyncRedis, tenant: str) -> set[str]:
    members = cast(set[bytes], await client.smembers(keys.withdrawn(tenant)))
    return {member.decode() for member in members}


async def test_catalog_events_are_applied_while_the_log_trails_impressions(
    client: AsyncRedis,
) -> None:
    tenant = "cs" + uuid.uuid4().hex[:8]
    log = RedisStreamEventLog(client, dedupe_ttl_s=600)
    events, catalog = readers(client, tenant)
    await events.prepare()
    await catalog.prepare()
    now = int(time.time() * 1000)
    impressions = [
        events_pb2.Event(
            event_id=uuid.uuid4().hex, type="impression", user_id="u", item_id=i, ts_ms=now
        )
        for i in range(500)
    ]
    await log.append(tenant, impressions)
    batch = [upsert("sku-1"), delete_event("sku-1", now)]
    await log.resolve_items(tenant, batch)
    await log.append(tenant, batch)
    internal = str(batch[0].item_id)

    # Only the catalog stream's reader runs: the 500 impressions ahead of the delete in the
    # log wait, the catalog does not.
    assert await catalog.read_once() == 2
    assert internal in await withdrawn(client, tenant)
    assert await client.zscore(keys.item_changes(tenant), internal) is not None
    assert await client.xlen(keys.catalog_events(tenant)) == 2  # impressions are not copied

    # The log's reader reaches the same events later: they were applied, nothing changes.
    before = await client.get(keys.item_row(tenant, int(internal)))
    assert await events.read_once() == 502
    assert internal in await withdrawn(client, tenant)
    assert await client.get(keys.item_row(tenant, int(internal))) == before


async def test_the_later_event_wins_whichever_reader_applies_the_earlier_one(
    client: AsyncRedis,
) -> None:
    tenant = "cs" + uuid.uuid4().hex[:8]
    log = RedisStreamEventLog(client, dedupe_ttl_s=600)
    events, catalog = readers(client, tenant)
    await events.prepare()
    await catalog.prepare()
    first = [delete_event("sku-2", int(time.time() * 1000))]
    await log.resolve_items(tenant, first)
    await log.append(tenant, first)
    # The log's reader applies the delete; the catalog reader has not read yet.
    assert await events.read_once() == 1
    internal = str(first[0].item_id)
    assert internal in await withdrawn(client, tenant)

    second = [upsert("sku-2")]
    await log.resolve_items(tenant, second)
    await log.append(tenant, second)
    # The catalog reader now reads both: the delete is a no-op (applied), the upsert wins.
    assert await catalog.read_once() == 2
    assert internal not in await withdrawn(client, tenant)
    assert await events.read_once() == 1
    assert internal not in await withdrawn(client, tenant)
