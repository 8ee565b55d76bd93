"""The loop closed end to end: a click posted to the gateway reaches the projector through
the event log, and the clicked item is no longer recommended to that user."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import pytest
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core import keys
from mesh import redis as mesh_redis
from mesh.client import open_channel
from mesh.context import TENANT_KEY
from mesh.redis import AsyncRedis
from mesh.testing import built_server, serving
from services.projector.server import build_service
from services.projector.settings import ProjectorSettings
from tests.inprocess import Mesh, accepted, write_tenants


@pytest.fixture(scope="module")
async def projector(
    mesh: Mesh, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[None]:
    tenants = write_tenants(tmp_path_factory.mktemp("projector") / "tenants.json")
    settings = ProjectorSettings(port=0, drain_delay_s=0.0, redis_url=redis_url, tenants=tenants)
    async with serving(await built_server(build_service, settings)):
        yield


@pytest.fixture
async def valkey(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = mesh_redis.client(redis_url)
    yield client
    await client.aclose()


async def test_a_clicked_item_is_not_recommended_again_and_its_counters_moved(
    mesh: Mesh, projector: None, valkey: AsyncRedis
) -> None:
    # A user of the artifact set with a materialised history, which a new materialisation
    # rewrites (below); no other test of the session uses these users.
    materialised = [
        user
        for user in (f"u{n}" for n in range(480, 500))
        if await valkey.llen(keys.history("demo", user))
    ]
    user = materialised[0]
    answer = await accepted(mesh, "/v1/recommend", {"user_id": user, "num_items": 10})
    clicked: str = answer["items"][0]["item_id"]
    number = int(clicked)  # a set item: its internal id, which the projections are keyed by
    click = {
        "event_id": uuid.uuid4().hex,
        "type": "click",
        "user_id": user,
        "item_id": clicked,
        "request_id": answer["request_id"],
        "ts": int(time.time() * 1000),
    }
    await accepted(mesh, "/v1/events", {"events": [click]})
    shown: list[str] = [clicked]
    for _ in range(100):  # the outbox relay, the log and the projector: well under 5 s
        again = await accepted(mesh, "/v1/recommend", {"user_id": user, "num_items": 10})
        shown = [item["item_id"] for item in again["items"]]
        if clicked not in shown:
            break
        await asyncio.sleep(0.05)
    assert clicked not in shown
    assert len(shown) == 10

    # A new materialisation of the artifact set replaces the batch history, not the
    # outcomes the projector keeps: the click still counts.
    async with open_channel(mesh.addr("feature")) as channel:
        await feature_pb2_grpc.FeatureServiceStub(channel).Materialize(
            feature_pb2.MaterializeRequest(force=True), metadata=[(TENANT_KEY, "demo")], timeout=60
        )
    again = await accepted(mesh, "/v1/recommend", {"user_id": user, "num_items": 10})
    assert clicked not in [item["item_id"] for item in again["items"]]
    # The answer's impressions can reach the log after the click (the gateway lingers up
    # to 150 ms before sending them; clicks go through its outbox): both are counted.
    for _ in range(100):
        counters = await valkey.hgetall(keys.item_counters("demo", number))
        if b"click" in counters and b"impression" in counters:
            break
        await asyncio.sleep(0.05)
    assert float(counters[b"click"]) >= 1.0
    assert float(counters[b"impression"]) >= 1.0
    assert await valkey.zscore(keys.trending("demo"), str(number)) is not None
    category = cast(bytes, await valkey.getrange(keys.item_row("demo", number), -4, -1))
    shares = await valkey.hgetall(keys.category_shares("demo", user))
    assert int(shares[str(int.from_bytes(category, "little", signed=True)).encode()]) >= 1
