"""``recmesh explain``: an answer's lineage read back from the event log of the live mesh."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.artifacts import resolve_current
from mesh.client import open_channel
from mesh.context import TENANT_KEY
from ops import explain
from tests.inprocess import Mesh, accepted


def impression_ids(request_id: str, shown: int) -> set[str]:
    """The event ids of an answer's impressions (the gateway's ``<request>:<position>``)."""
    return {f"{request_id}:{position}" for position in range(shown)}


async def request_events(mesh: Mesh, request_id: str, wanted: set[str]) -> list[Any]:
    """The stored events of ``request_id`` (demo), once every event id of ``wanted`` is
    among them (5 s at most). By id, not by count: the request's exposures name it too,
    and the gateway's impressions and the posted events reach the log by different ways."""
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(100):
            reply = await stub.ReadRequestEvents(
                events_pb2.ReadRequestEventsRequest(request_id=request_id),
                metadata=[(TENANT_KEY, "demo")],
            )
            missing = wanted - {e.event.event_id for e in reply.events}
            if not missing:
                return list(reply.events)
            await asyncio.sleep(0.05)
    pytest.fail(f"events {sorted(missing)} of {request_id} not stored after 5 s")


async def test_explain_gives_each_shown_item_its_lineage_and_outcome(
    mesh: Mesh, artifacts_root: Path
) -> None:
    answer = await accepted(mesh, "/v1/recommend", {"user_id": "u7", "num_items": 5})
    request_id = answer["request_id"]
    shown = answer["items"]
    now = int(time.time() * 1000)
    outcomes = [
        {"type": "click", "item_id": shown[1]["item_id"]},
        # Names the request, but was not shown (the set's item number 10**9: none is that high).
        {"type": "conversion", "item_id": str(10**9)},
    ]
    events = [
        {"event_id": uuid.uuid4().hex, "user_id": "u7", "request_id": request_id, "ts": now, **o}
        for o in outcomes
    ]
    await accepted(mesh, "/v1/events", {"events": events})
    posted = {e["event_id"] for e in events}
    await request_events(mesh, request_id, impression_ids(request_id, len(shown)) | posted)

    code, text = await asyncio.to_thread(
        explain.show, request_id, mesh.addr("events"), ["acme", "demo"], False
    )
    assert code == 0 and request_id in text and "click" in text
    code, text = await asyncio.to_thread(
        explain.show, request_id, mesh.addr("events"), ["acme", "demo"], True
    )
    assert code == 0
    explained = json.loads(text)
    version = resolve_current(artifacts_root).name
    assert explained["tenant"] == "demo" and explained["user_id"] == "u7"
    assert (explained["retrieval_version"], explained["ranking_version"]) == (version, version)
    assert explained["variants"] == {e["key"]: e["variant"] for e in answer["experiments"]}
    assert explained["degraded"] == answer["degraded"]
    # The log's internal ids: a set item's is its number, the id the answer named it by.
    assert [
        (i["position"], str(i["item_id"]), i["score"], i["source"]) for i in explained["items"]
    ] == [(i["rank"] - 1, i["item_id"], i["score"], i["source"]) for i in shown]
    assert [i["outcomes"] for i in explained["items"]] == [[], ["click"], [], [], []]
    assert all(0.0 < i["propensity"] <= 1.0 for i in explained["items"])
    assert explained["unmatched"] == [
        {"type": "conversion", "item_id": 10**9, "event_id": events[1]["event_id"]}
    ]


async def test_another_tenants_log_or_an_unknown_request_explains_nothing(mesh: Mesh) -> None:
    answer = await accepted(mesh, "/v1/recommend", {"user_id": "u8", "num_items": 3})
    await request_events(mesh, answer["request_id"], impression_ids(answer["request_id"], 3))
    code, text = await asyncio.to_thread(
        explain.show, answer["request_id"], mesh.addr("events"), ["acme"], False
    )
    assert code == 1 and "no events" in text
    code, _ = await asyncio.to_thread(
        explain.show, "never-" + uuid.uuid4().hex, mesh.addr("events"), ["demo"], False
    )
    assert code == 1
