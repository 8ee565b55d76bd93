"""The public HTTP and gRPC API over the whole mesh running in-process."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from mesh.client import open_channel
from mesh.context import TENANT_KEY
from tests.inprocess import Mesh, reset_quota

DEMO = {"x-api-key": "demo-key"}


async def post(mesh: Mesh, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        data = body if isinstance(body, bytes) else None
        kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        async with session.post(mesh.http_url + path, headers=headers, **kwargs) as response:
            return response.status, await response.json(), response.headers


async def test_recommend_returns_ranked_items_with_the_documented_shape(mesh: Mesh) -> None:
    status, body, _ = await post(mesh, "/v1/recommend", {"user_id": "u1", "num_items": 10}, DEMO)
    assert status == 200, body
    assert set(body) == {"request_id", "items", "experiments", "degraded", "stage_ms"}
    items = body["items"]
    assert len(items) == 10
    assert [i["rank"] for i in items] == list(range(1, 11))
    # The tenant's own ids: strings (the artifact set's items are named by their number).
    assert all(isinstance(i["item_id"], str) and i["item_id"].isdigit() for i in items)
    assert len({i["item_id"] for i in items}) == 10
    scores = [i["score"] for i in items]
    assert all(isinstance(s, float) for s in scores)
    assert {i["source"] for i in items} <= {"ann", "trending", "popular"}
    assert body["degraded"] == []
    assert {"admission", "retrieval", "ranking"} <= set(body["stage_ms"])
    assert {e["key"] for e in body["experiments"]} >= {"retrieval-k"}


async def test_recommend_debug_explains_each_stage(mesh: Mesh) -> None:
    status, body, _ = await post(
        mesh, "/v1/recommend", {"user_id": "u2", "num_items": 5, "debug": True}, DEMO
    )
    assert status == 200
    stages = {s["stage"]: s for s in body["stages"]}
    assert {"user_features", "ann", "merge", "item_features", "prerank", "rerank"} <= set(stages)
    assert stages["rerank"]["candidates_out"] == 5
    assert stages["prerank"]["candidates_in"] >= stages["prerank"]["candidates_out"]


async def test_unknown_user_gets_popular_items_not_an_error(mesh: Mesh) -> None:
    status, body, _ = await post(mesh, "/v1/recommend", {"user_id": "never-seen"}, DEMO)
    assert status == 200
    assert len(body["items"]) == 10
    # No ANN for a user the model does not know: the tenant's trending and popular items
    # (trending when the session's other tests have clicked something of the tenant).
    assert {i["source"] for i in body["items"]} <= {"trending", "popular"}


async def test_same_user_same_experiment_variants(mesh: Mesh) -> None:
    first = (await post(mesh, "/v1/recommend", {"user_id": "u7"}, DEMO))[1]["experiments"]
    second = (await post(mesh, "/v1/recommend", {"user_id": "u7"}, DEMO))[1]["experiments"]
    assert first == second


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}])
async def test_missing_or_unknown_key_is_401(mesh: Mesh, headers: dict[str, str]) -> None:
    status, body, _ = await post(mesh, "/v1/recommend", {"user_id": "u1"}, headers)
    assert status == 401
    assert body["error"] == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        ({"num_items": 3}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "x" * 129}, "user_id"),
        ({"user_id": "é" * 65}, "user_id"),
        ({"user_id": 12}, "user_id"),
        ({"user_id": "u1", "num_items": 0}, "num_items"),
        ({"user_id": "u1", "num_items": 501}, "num_items"),
        ({"user_id": "u1", "num_items": "ten"}, "num_items"),
        ({"user_id": "u1", "num_items": True}, "num_items"),
        ({"user_id": "u1", "debug": "yes"}, "debug"),
    ],
)
async def test_invalid_body_is_400_naming_the_field(mesh: Mesh, body: Any, field: str) -> None:
    status, reply, _ = await post(mesh, "/v1/recommend", body, DEMO)
    assert status == 400
    assert reply["field"] == field


async def test_over_quota_is_429_with_retry_after(mesh: Mesh, redis_url: str) -> None:
    await reset_quota(redis_url, "tiny")
    tiny = {"x-api-key": "tiny-key"}
    statuses = [(await post(mesh, "/v1/recommend", {"user_id": "u1"}, tiny)) for _ in range(4)]
    codes = [s for s, _, _ in statuses]
    assert codes[:2] == [200, 200]
    assert 429 in codes[2:]
    rejected = next(r for r in statuses if r[0] == 429)
    assert rejected[1]["error"] == "RESOURCE_EXHAUSTED"
    assert int(rejected[2]["Retry-After"]) >= 1


async def stored_events(mesh: Mesh, tenant: str, wanted: int, **match: object) -> list[Any]:
    """Events of ``tenant`` whose fields equal ``match``, once ``wanted`` arrived (5 s max);
    the whole log is read, a page of 1000 at a time (the session's tests share it)."""
    async with open_channel(mesh.addr("events")) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for _ in range(100):
            stored: list[Any] = []
            while True:
                after = stored[-1].position if stored else ""
                reply = await stub.Read(
                    events_pb2.ReadRequest(after=after, limit=1000),
                    metadata=[(TENANT_KEY, tenant)],
                )
                stored += reply.events
                if len(reply.events) < 1000:
                    break
            found = [
                e.event for e in stored if all(getattr(e.event, k) == v for k, v in match.items())
            ]
            if len(found) >= wanted:
                return found
            await asyncio.sleep(0.05)
    return found


async def test_events_are_accepted_and_stored_once(mesh: Mesh) -> None:
    event_id = uuid.uuid4().hex
    event = {
        "event_id": event_id,
        "type": "click",
        "user_id": "u1",
        "item_id": "42",
        "request_id": "r1",
        "ts": int(time.time() * 1000),
    }
    for _ in range(2):
        status, body, _ = await post(mesh, "/v1/events", {"events": [event]}, DEMO)
        assert (status, body) == (202, {"accepted": 1})
    await stored_events(mesh, "demo", 1, event_id=event_id)
    await asyncio.sleep(0.3)
    stored = await stored_events(mesh, "demo", 1, event_id=event_id)
    assert len(stored) == 1
    # The log keeps the client's id and the internal one (the set's item 42 is 42).
    assert stored[0].item_ref == "42" and stored[0].item_id == 42
    assert stored[0].type == "click"


async def test_impressions_are_logged_off_the_request_path(mesh: Mesh) -> None:
    status, body, _ = await post(mesh, "/v1/recommend", {"user_id": "u3", "num_items": 4}, DEMO)
    assert status == 200
    # The request's events are its impressions, and the exposures it made (once a day per
    # user and variant: gateway/exposures.py), which name the request too.
    shown = await stored_events(mesh, "demo", 4, request_id=body["request_id"], type="impression")
    assert [str(e.item_id) for e in sorted(shown, key=lambda e: e.position)] == [
        i["item_id"] for i in body["items"]
    ]
    logged = await stored_events(mesh, "demo", 0, request_id=body["request_id"])
    assert {e.type for e in logged} <= {"impression", "exposure"}


async def test_invalid_event_is_400_naming_it(mesh: Mesh) -> None:
    status, body, _ = await post(
        mesh,
        "/v1/events",
        {"events": [{"event_id": "e", "type": "teleport", "user_id": "u", "ts": 1}]},
        DEMO,
    )
    assert status == 400
    assert body["field"] == "events[0].type"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"item_id": 42}, "events[0].item_id"),
        ({"item_id": "x" * 129}, "events[0].item_id"),
        ({"type": "item_upsert"}, "events[0].type"),
        ({"type": "item_delete"}, "events[0].type"),
        ({"user_id": "x" * 129}, "events[0].user_id"),
    ],
)
async def test_an_event_naming_an_item_by_number_or_changing_the_catalog_is_400(
    mesh: Mesh, changes: dict[str, Any], field: str
) -> None:
    event = {
        "event_id": uuid.uuid4().hex,
        "type": "click",
        "user_id": "u1",
        "item_id": "42",
        "ts": int(time.time() * 1000),
    } | changes
    status, body, _ = await post(mesh, "/v1/events", {"events": [event]}, DEMO)
    assert status == 400, body
    assert body["field"] == field


async def test_an_event_older_than_the_dedupe_window_is_400(mesh: Mesh) -> None:
    """A retry that late could find its id forgotten and count twice: it is refused."""
    eight_days_ago = int(time.time() * 1000) - 8 * 86_400_000
    status, body, _ = await post(
        mesh,
        "/v1/events",
        {"events": [{"event_id": "old", "type": "click", "user_id": "u", "ts": eight_days_ago}]},
        DEMO,
    )
    assert status == 400
    assert body["field"] == "events[0].ts"
    assert "days old" in body["message"]


async def test_healthz_metrics_and_openapi(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(mesh.http_url + "/healthz") as response:
            health = await response.json()
            assert response.status == 200
            assert set(health["dependencies"].values()) == {"SERVING"}
        async with session.get(mesh.http_url + "/metrics") as response:
            assert "recmesh_gateway_requests_total" in await response.text()
        async with session.get(mesh.http_url + "/openapi.json") as response:
            spec = await response.json()
            assert "/v1/recommend" in spec["paths"]


async def test_grpc_api_matches_http(mesh: Mesh) -> None:
    async with open_channel(mesh.addr("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id="u1", num_items=7),
            metadata=[("x-api-key", "demo-key")],
        )
        assert len(reply.items) == 7
        assert [i.rank for i in reply.items] == list(range(1, 8))
        assert len({i.item_id for i in reply.items}) == 7
        assert all(i.item_id.isdigit() for i in reply.items)
        assert all(i.propensity == 0.0 for i in reply.items)  # only with debug
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await stub.Recommend(gateway_pb2.RecommendRequest(user_id="u1"))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.Recommend(
                gateway_pb2.RecommendRequest(user_id="u1", num_items=10**6),
                metadata=[("x-api-key", "demo-key")],
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-recmesh-field", "num_items") in tuple(invalid.value.trailing_metadata() or ())


async def test_grpc_log_events_takes_the_tenants_item_ids(mesh: Mesh) -> None:
    event_id = uuid.uuid4().hex
    demo = [("x-api-key", "demo-key")]
    async with open_channel(mesh.addr("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply = await stub.LogEvents(
            gateway_pb2.LogEventsRequest(
                events=[
                    gateway_pb2.ClientEvent(
                        event_id=event_id,
                        type="click",
                        user_id="u1",
                        item_id="43",
                        request_id="r1",
                        ts_ms=int(time.time() * 1000),
                    )
                ]
            ),
            metadata=demo,
        )
        assert reply.accepted == 1

        async def log_one(type_: str, user_id: str = "", item_id: str = "") -> None:
            event = gateway_pb2.ClientEvent(
                event_id=uuid.uuid4().hex,
                type=type_,
                user_id=user_id,
                item_id=item_id,
                ts_ms=int(time.time() * 1000),
            )
            await stub.LogEvents(gateway_pb2.LogEventsRequest(events=[event]), metadata=demo)

        with pytest.raises(grpc.aio.AioRpcError) as catalog:
            await log_one("item_delete", item_id="43")
        assert catalog.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-recmesh-field", "events[0].type") in tuple(
            catalog.value.trailing_metadata() or ()
        )
        with pytest.raises(grpc.aio.AioRpcError) as exposure:  # the gateway's own type
            await log_one("exposure", user_id="u1")
        assert exposure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the gateway's own" in (exposure.value.details() or "")
    stored = await stored_events(mesh, "demo", 1, event_id=event_id)
    assert len(stored) == 1
    assert (stored[0].item_ref, stored[0].item_id) == ("43", 43)
