"""The live catalog through the whole mesh (issue 16): a tenant's own string ids, items
upserted and deleted through the gateway, written to the log, applied by the projector and
served (or never served again) by retrieval; a set swap keeps every upsert.

The mesh runs in this process with a projector reading the log (its reader, without the
process around it), as ``recmesh up`` runs one.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import numpy as np
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core import keys
from core.artifacts import load_artifact_set, resolve_current
from core.catalog import LIVE_BASE, MAX_ITEMS_PER_CALL, replay_ids
from mesh import redis as mesh_redis
from mesh.client import open_channel
from mesh.context import TENANT_KEY
from mesh.tenants import load_tenants
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections
from services.retrieval.index import RetrievalModels
from tests.inprocess import Mesh, inprocess_mesh, set_faults, write_tenants

TENANT, KEY = "acme", "acme-key"
WAIT_S = 5.0
"""How long a test waits for a change to be served; the 1 s bar is measured in
``loadtest.catalog_latency`` (docs/catalog.md), not asserted here."""


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fault flags file the mesh watches (``tests.inprocess.set_faults``)."""
    return tmp_path_factory.mktemp("catalog-faults") / "faults.json"


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory, faults: Path
) -> AsyncIterator[Mesh]:
    base = tmp_path_factory.mktemp("catalog")
    tenants = write_tenants(base / "tenants.json")
    async with inprocess_mesh(redis_url, artifacts_root, tenants, faults) as running:
        client = mesh_redis.client(redis_url)
        projector = StreamProjector(
            client,
            Projections(client, history_cap=200, half_life_s=3600.0, applied_ttl_s=600),
            list(load_tenants(tenants).tenants),
            group="projector",
            consumer="catalog-test",
            block_ms=20,
        )
        await projector.prepare()
        await projector.start()
        try:
            yield running
        finally:
            await projector.stop()
            await client.aclose()


@pytest.fixture(scope="module")
def set_items(artifacts_root: Path) -> tuple[np.ndarray, np.ndarray]:
    artifacts = load_artifact_set(resolve_current(artifacts_root))
    return artifacts.open_array("item_features"), artifacts.open_array("item_categories")


async def call(
    mesh: Mesh, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            mesh.http_url + path,
            data=io.BytesIO(data) if data is not None else None,
            headers={"x-api-key": KEY, "content-type": "application/json"},
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


async def retrieved(mesh: Mesh, user: str) -> dict[str, int]:
    """Retrieval's candidates for ``user``, by the tenant's name of each."""
    async with open_channel(mesh.addr("retrieval")) as channel:
        reply = await retrieval_pb2_grpc.RetrievalServiceStub(channel).Retrieve(
            retrieval_pb2.RetrieveRequest(user_id=user, fresh_k=200),
            metadata=[(TENANT_KEY, TENANT)],
        )
    return {reply.names.get(i, str(i)): i for i in reply.candidates.item_ids}


async def until(check: Any, what: str) -> None:
    """Wait until the async ``check()`` holds, :data:`WAIT_S` at most."""
    for _ in range(int(WAIT_S / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} not within {WAIT_S} s")


def item(ref: str, row: np.ndarray, category: int, **extra: Any) -> dict[str, Any]:
    return {"item_id": ref, "category": category, "features": row.tolist(), **extra}


async def test_an_upserted_item_is_served_under_its_own_id_and_a_deleted_one_never_again(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, categories = set_items
    ref = f"sku-{uuid.uuid4().hex[:8]}"
    status, body = await call(
        mesh, "PUT", "/v1/items", {"items": [item(ref, rows[3], int(categories[3]))]}
    )
    assert (status, body) == (202, {"accepted": 1})

    async def served() -> bool:
        return ref in await retrieved(mesh, "catalog-user")

    await until(served, f"{ref} served")
    internal = (await retrieved(mesh, "catalog-user"))[ref]
    assert internal >= LIVE_BASE
    answer = await call(
        mesh, "POST", "/v1/recommend", {"user_id": "catalog-user", "num_items": 500}
    )
    assert all(isinstance(i["item_id"], str) for i in answer[1]["items"])

    assert await call(mesh, "DELETE", f"/v1/items/{ref}") == (202, {"accepted": 1})

    async def gone() -> bool:
        return ref not in await retrieved(mesh, "catalog-user")

    await until(gone, f"{ref} withdrawn")
    for _ in range(10):
        assert ref not in await retrieved(mesh, "catalog-user")


async def test_a_deleted_set_item_leaves_answers_and_an_upsert_brings_it_back(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, categories = set_items
    user = "catalog-shown"
    status, answer = await call(mesh, "POST", "/v1/recommend", {"user_id": user})
    assert status == 200
    shown = answer["items"][0]["item_id"]
    assert isinstance(shown, str)
    assert await call(mesh, "DELETE", f"/v1/items/{shown}") == (202, {"accepted": 1})

    async def left() -> bool:
        _, again = await call(mesh, "POST", "/v1/recommend", {"user_id": user})
        return shown not in {i["item_id"] for i in again["items"]}

    await until(left, f"{shown} left the answers")
    for _ in range(5):
        _, again = await call(mesh, "POST", "/v1/recommend", {"user_id": user, "num_items": 100})
        assert shown not in {i["item_id"] for i in again["items"]}

    number = int(shown)
    back = item(shown, rows[number], int(categories[number]))
    assert (await call(mesh, "PUT", "/v1/items", {"items": [back]}))[0] == 202

    async def returned() -> bool:
        return shown in await retrieved(mesh, user)

    await until(returned, f"{shown} served again")


async def test_the_popular_fallback_leaves_out_an_item_deleted_after_it_was_cached(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray], faults: Path
) -> None:
    rows, categories = set_items

    async def fallback_answer(user: str) -> list[str]:
        set_faults(mesh, faults, {"retrieval": {"*": {"error_rate": 1.0, "code": "UNAVAILABLE"}}})
        try:
            status, body = await call(
                mesh, "POST", "/v1/recommend", {"user_id": user, "num_items": 50}
            )
        finally:
            set_faults(mesh, faults, {})
        assert status == 200 and "retrieval" in body["degraded"], body
        return [i["item_id"] for i in body["items"]]

    # The gateway read its list at start; the item is withdrawn after that.
    cached = (await fallback_answer("fallback-before"))[0]
    assert await call(mesh, "DELETE", f"/v1/items/{cached}") == (202, {"accepted": 1})

    async def left_fallback() -> bool:
        return cached not in await fallback_answer("fallback-after")

    try:
        # Within the check's recheck_s (0.5 s) the cache may still hold it: wait for it.
        await until(left_fallback, f"{cached} left the fallback")
        for _ in range(3):
            assert cached not in await fallback_answer("fallback-after")
    finally:
        number = int(cached)
        back = item(cached, rows[number], int(categories[number]))
        assert (await call(mesh, "PUT", "/v1/items", {"items": [back]}))[0] == 202

    async def back_in_fallback() -> bool:
        return cached in await fallback_answer("fallback-back")

    await until(back_in_fallback, f"{cached} back in the fallback")


async def test_an_unavailable_item_is_not_served_and_the_log_order_decides(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, categories = set_items
    hidden, last = f"off-{uuid.uuid4().hex[:8]}", f"order-{uuid.uuid4().hex[:8]}"
    batch = [
        item(hidden, rows[4], int(categories[4]), available=False),
        item(last, rows[5], int(categories[5])),
    ]
    assert (await call(mesh, "PUT", "/v1/items", {"items": batch}))[0] == 202
    # The same id upserted, deleted and upserted again, back to back: the log's order decides.
    assert (await call(mesh, "DELETE", f"/v1/items/{last}"))[0] == 202
    assert (await call(mesh, "PUT", "/v1/items", {"items": [batch[1]]}))[0] == 202

    async def served() -> bool:
        return last in await retrieved(mesh, "catalog-order")

    await until(served, f"{last} served after upsert, delete, upsert")
    assert hidden not in await retrieved(mesh, "catalog-order")

    deleted = f"del-{uuid.uuid4().hex[:8]}"
    assert (await call(mesh, "PUT", "/v1/items", {"items": [item(deleted, rows[6], 0)]}))[0] == 202
    assert (await call(mesh, "DELETE", f"/v1/items/{deleted}"))[0] == 202
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    assert (await call(mesh, "PUT", "/v1/items", {"items": [item(probe, rows[7], 0)]}))[0] == 202

    async def probed() -> bool:
        return probe in await retrieved(mesh, "catalog-order")

    await until(probed, "the probe upserted after the delete")
    assert deleted not in await retrieved(mesh, "catalog-order")


async def test_a_set_swap_rebuilds_the_live_index_and_keeps_every_upsert(
    mesh: Mesh, artifacts_root: Path, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, categories = set_items
    ref = f"swap-{uuid.uuid4().hex[:8]}"
    assert (
        await call(mesh, "PUT", "/v1/items", {"items": [item(ref, rows[8], int(categories[8]))]})
    )[0] == 202

    async def served() -> bool:
        return ref in await retrieved(mesh, "catalog-swap")

    await until(served, f"{ref} served")
    servicer = mesh.servers["retrieval"].service.servicer("RetrievalService")
    # What the hot swap does once a new set loaded: the servicer's models are replaced.
    servicer.models = RetrievalModels(resolve_current(artifacts_root))
    assert ref in await retrieved(mesh, "catalog-swap")


async def test_events_name_items_by_the_tenants_ids_and_the_log_keeps_the_mapping(
    mesh: Mesh, redis_url: str
) -> None:
    ref = f"click-{uuid.uuid4().hex[:8]}"
    now = int(time.time() * 1000)
    clicks: list[dict[str, Any]] = [
        {"event_id": uuid.uuid4().hex, "type": "click", "user_id": "u-ids", "item_id": ref,
         "ts": now},
        {"event_id": uuid.uuid4().hex, "type": "click", "user_id": "u-ids", "item_id": "12",
         "ts": now},
        {"event_id": uuid.uuid4().hex, "type": "click", "user_id": "u-ids", "item_id": ref,
         "ts": now},
    ]  # fmt: skip
    assert await call(mesh, "POST", "/v1/events", {"events": clicks}) == (202, {"accepted": 3})
    wanted = {c["event_id"] for c in clicks}
    stored: list[events_pb2.Event] = []

    async def logged() -> bool:
        nonlocal stored
        stored, after = [], ""
        async with open_channel(mesh.addr("events")) as channel:
            while True:
                reply = await events_pb2_grpc.EventServiceStub(channel).Read(
                    events_pb2.ReadRequest(after=after, limit=1000),
                    metadata=[(TENANT_KEY, TENANT)],
                )
                if not reply.events:
                    break
                stored += [e.event for e in reply.events]
                after = reply.events[-1].position
        return wanted <= {e.event_id for e in stored}

    await until(logged, "the clicks in the log")
    mine = {e.event_id: e for e in stored if e.event_id in wanted}
    first, number, again = (mine[str(c["event_id"])] for c in clicks)
    assert first.item_ref == ref and first.item_id >= LIVE_BASE
    assert again.item_id == first.item_id
    assert (number.item_ref, number.item_id) == ("12", 12)
    client = mesh_redis.client(redis_url)
    try:
        held = cast(dict[bytes, bytes], await client.hgetall(keys.item_ids(TENANT)))
    finally:
        await client.aclose()
    assert replay_ids(stored) == {k.decode(): int(v) for k, v in held.items()}


async def test_impressions_of_a_tenants_item_carry_its_name(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, categories = set_items
    ref = f"shown-{uuid.uuid4().hex[:8]}"
    body = {"items": [item(ref, rows[5], int(categories[5]))]}
    assert (await call(mesh, "PUT", "/v1/items", body))[0] == 202

    async def served() -> bool:
        return ref in await retrieved(mesh, "catalog-user")

    await until(served, f"{ref} served")
    answer: dict[str, Any] = {}

    async def answered_with_it() -> bool:
        nonlocal answer
        user = f"impressions-{uuid.uuid4().hex[:6]}"
        _, answer = await call(mesh, "POST", "/v1/recommend", {"user_id": user, "num_items": 500})
        return ref in {i["item_id"] for i in answer["items"]}

    await until(answered_with_it, f"an answer showing {ref}")
    shown = {i["rank"]: i["item_id"] for i in answer["items"]}
    impressions: list[events_pb2.Event] = []

    async def logged() -> bool:
        nonlocal impressions
        async with open_channel(mesh.addr("events")) as channel:
            reply = await events_pb2_grpc.EventServiceStub(channel).ReadRequestEvents(
                events_pb2.ReadRequestEventsRequest(request_id=answer["request_id"]),
                metadata=[(TENANT_KEY, TENANT)],
            )
        impressions = [e.event for e in reply.events if e.event.type == "impression"]
        return len(impressions) == len(shown)

    await until(logged, "the answer's impressions in the log")
    for event in impressions:
        name = shown[event.position + 1]
        # The tenant's own items by their name; the set's items by their number alone.
        assert event.item_ref == ("" if name.isdigit() else name)
    assert ref in {event.item_ref for event in impressions}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": [{"item_id": "x" * 129, "features": [0.0]}]}, "items[0].item_id"),
        ({"items": [{"item_id": "", "features": [0.0]}]}, "items[0].item_id"),
        ({"items": [{"item_id": "a", "features": [0.0], "colour": "red"}]}, "items[0].colour"),
        ({"items": [{"item_id": "a", "features": [0.0]}]}, "items[0].features"),
        ({"items": [{"item_id": "a", "features": ["x"]}]}, "items[0].features[0]"),
        ({"items": [{"item_id": "a", "features": [], "category": -1}]}, "items[0].category"),
        ({"items": []}, "items"),
        ({"items": [{"item_id": str(n), "features": []} for n in range(1001)]}, "items"),
    ],
)
async def test_bad_items_are_refused_with_the_field_named(
    mesh: Mesh, body: dict[str, Any], field: str
) -> None:
    status, error = await call(mesh, "PUT", "/v1/items", body)
    assert (status, error["field"]) == (400, field), error


async def test_non_finite_and_wrong_width_features_are_refused(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, _ = set_items
    width = rows.shape[1]
    # NaN and Infinity are not JSON: the body itself is refused.
    for values in ([math.nan] * width, [math.inf] * width):
        status, error = await call(
            mesh,
            "PUT",
            "/v1/items",
            raw=json.dumps({"items": [item("a", np.array(values), 0)]}).encode(),
        )
        assert (status, error["field"]) == (400, "body"), (values[:1], error)
    # Too many values; a value float32 cannot hold (infinite once stored).
    for values, field in (
        ([0.0] * (width + 1), "items[0].features"),
        ([1e39] * width, "items[0].features[0]"),
    ):
        status, error = await call(
            mesh,
            "PUT",
            "/v1/items",
            raw=json.dumps({"items": [item("a", np.array(values), 0)]}).encode(),
        )
        assert (status, error["field"]) == (400, field), (values[:1], error)


async def test_an_oversized_body_is_413_and_int_item_ids_are_refused_in_events(
    mesh: Mesh,
) -> None:
    huge = {"items": [{"item_id": f"i{n}", "features": [0.0] * 64} for n in range(100_000)]}
    status, _ = await call(mesh, "PUT", "/v1/items", huge)
    assert status == 413
    assert MAX_ITEMS_PER_CALL < 100_000
    click = {"event_id": "e1", "type": "click", "user_id": "u", "item_id": 7, "ts": 1}
    status, error = await call(mesh, "POST", "/v1/events", {"events": [click]})
    assert (status, error["field"]) == (400, "events[0].item_id")
    catalog = {"event_id": "e2", "type": "item_delete", "user_id": "u", "item_id": "7", "ts": 1}
    status, error = await call(mesh, "POST", "/v1/events", {"events": [catalog]})
    assert (status, error["field"]) == (400, "events[0].type")


async def test_an_item_of_a_category_the_models_never_saw_is_still_served(
    mesh: Mesh, set_items: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, _ = set_items
    ref = f"newcat-{uuid.uuid4().hex[:8]}"
    assert (await call(mesh, "PUT", "/v1/items", {"items": [item(ref, rows[9], 10_000)]}))[0] == 202

    async def served() -> bool:
        return ref in await retrieved(mesh, "catalog-newcat")

    await until(served, f"{ref} (category 10000) served")
