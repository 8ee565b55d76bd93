"""Trending through the whole mesh: a projected click makes its item a ``trending``
candidate of another user's answer, named so in the response and in the impression's
lineage in the event log, and not shown again to the user who clicked it."""

from __future__ import annotations

import asyncio

import pytest
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from mesh.client import open_channel
from mesh.context import TENANT_KEY
from tests.inprocess import Mesh, accepted
from tests.projected import event, project

TENANT, KEY = "acme", "acme-key"


async def impressions_of(mesh: Mesh, request_id: str, wanted: int) -> list[events_pb2.Event]:
    """The impressions logged for ``request_id``, once ``wanted`` arrived (5 s at most)."""
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(100):
            reply = await stub.ReadRequestEvents(
                events_pb2.ReadRequestEventsRequest(request_id=request_id),
                metadata=[(TENANT_KEY, TENANT)],
            )
            found = [e.event for e in reply.events if e.event.type == "impression"]
            if len(found) >= wanted:
                return found
            await asyncio.sleep(0.05)
    pytest.fail(f"{len(found)} of {wanted} impressions of {request_id} logged after 5 s")


async def test_a_clicked_item_is_shown_to_others_as_trending_with_its_lineage(
    mesh: Mesh, redis_url: str
) -> None:
    clicked = 1999  # the test world's least popular item: only trending can bring it
    await project(redis_url, TENANT, [event("click", f"tg-clicker{n}", clicked) for n in range(5)])
    name = str(clicked)  # how the answers name it (a set item: its number)

    # Retrieval's list of the tenant may be younger than its refresh period (0.5 s): the
    # click is visible within that.
    for _ in range(20):
        answer = await accepted(
            mesh, "/v1/recommend", {"user_id": "tg-newcomer", "num_items": 200}, KEY
        )
        sources = {item["item_id"]: item["source"] for item in answer["items"]}
        if name in sources:
            break
        await asyncio.sleep(0.1)
    assert sources.get(name) == "trending"
    logged = await impressions_of(mesh, answer["request_id"], len(answer["items"]))
    lineage = {e.item_id: e.source for e in logged}
    assert lineage[clicked] == common_pb2.SOURCE_TRENDING

    clicker = await accepted(
        mesh, "/v1/recommend", {"user_id": "tg-clicker0", "num_items": 200}, KEY
    )
    assert clicker["items"]
    assert name not in {item["item_id"] for item in clicker["items"]}
