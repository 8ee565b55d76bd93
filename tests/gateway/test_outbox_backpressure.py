"""A client that posts faster than the event log takes events in is told to slow down,
before the gateway's outbox grows without bound, and nothing of a refused post is kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from mesh.client import open_channel
from mesh.testing import tenant_metadata
from tests.inprocess import Mesh, inprocess_mesh, write_tenants

LIMIT = 5


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tenants = write_tenants(tmp_path_factory.mktemp("backlog") / "tenants.json")
    async with inprocess_mesh(
        redis_url, artifacts_root, tenants, gateway_overrides={"outbox_max_rows": LIMIT}
    ) as running:
        yield running


def clicks(n: int, tag: str) -> dict[str, object]:
    now = int(time.time() * 1000)
    return {
        "events": [
            {
                "event_id": f"{tag}-{i}",
                "type": "click",
                "user_id": f"u-{tag}",
                "item_id": str(i),
                "ts": now,
            }
            for i in range(n)
        ]
    }


async def test_a_post_past_the_backlog_limit_is_429_and_a_small_one_still_passes(
    mesh: Mesh,
) -> None:
    async with aiohttp.ClientSession() as session:

        async def post(body: dict[str, object]) -> tuple[int, dict[str, str]]:
            async with session.post(
                mesh.http_url + "/v1/events", json=body, headers={"x-api-key": "demo-key"}
            ) as response:
                return response.status, dict(response.headers)

        status, headers = await post(clicks(LIMIT + 1, "big"))
        assert status == 429
        assert float(headers["Retry-After"]) > 0
        assert (await post(clicks(2, "small")))[0] == 202
    stored: list[str] = []
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(100):  # the relay delivers the accepted post
            stored = []
            for user in ("u-small", "u-big"):  # by user: the log holds other tests' events
                reply = await stub.ReadUserEvents(
                    events_pb2.ReadUserEventsRequest(user_id=user, limit=1000),
                    metadata=tenant_metadata("demo"),
                )
                stored += [e.event.event_id for e in reply.events]
            if "small-1" in stored:
                break
            await asyncio.sleep(0.05)
    assert {"small-0", "small-1"} <= set(stored)
    assert not [event_id for event_id in stored if event_id.startswith("big-")]
