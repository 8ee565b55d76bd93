"""The events service against a real Redis, in-process on port 0."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core import keys
from mesh import redis as mesh_redis
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.events.log import RedisStreamEventLog
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings


@pytest.fixture(scope="module")
async def events(redis_url: str) -> AsyncIterator[events_pb2_grpc.EventServiceAsyncStub]:
    server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(server), channel_to(server) as channel:
        yield events_pb2_grpc.EventServiceStub(channel)


def event(event_id: str, **overrides: object) -> events_pb2.Event:
    fields: dict[str, object] = {
        "event_id": event_id,
        "type": "click",
        "user_id": "u1",
        "item_id": 3,
        "ts_ms": int(time.time() * 1000),
    }
    fields.update(overrides)
    return events_pb2.Event(**fields)  # type: ignore[arg-type]


async def test_append_is_idempotent_and_read_in_order(
    events: events_pb2_grpc.EventServiceAsyncStub,
) -> None:
    tenant = "ev" + uuid.uuid4().hex[:8]
    ids = [f"e{i}" for i in range(5)]
    first = await events.Append(
        events_pb2.AppendRequest(events=[event(i) for i in ids]), metadata=tenant_metadata(tenant)
    )
    again = await events.Append(
        events_pb2.AppendRequest(events=[event(ids[0]), event("e5")]),
        metadata=tenant_metadata(tenant),
    )
    assert (first.appended, first.duplicates) == (5, 0)
    assert (again.appended, again.duplicates) == (1, 1)
    counted = {
        outcome: REGISTRY.get_sample_value(
            "recmesh_events_appends_total",
            {"tenant": tenant, "outcome": outcome, "field": ""},
        )
        for outcome in ("appended", "duplicate")
    }
    assert counted == {"appended": 6.0, "duplicate": 1.0}
    reply = await events.Read(events_pb2.ReadRequest(), metadata=tenant_metadata(tenant))
    assert [e.event.event_id for e in reply.events] == [*ids, "e5"]
    after = await events.Read(
        events_pb2.ReadRequest(after=reply.events[2].position), metadata=tenant_metadata(tenant)
    )
    assert [e.event.event_id for e in after.events] == ["e3", "e4", "e5"]


async def test_tenants_never_see_each_others_events(
    events: events_pb2_grpc.EventServiceAsyncStub,
) -> None:
    a, b = "ev" + uuid.uuid4().hex[:8], "ev" + uuid.uuid4().hex[:8]
    await events.Append(
        events_pb2.AppendRequest(events=[event("shared-id")]), metadata=tenant_metadata(a)
    )
    stored_b = await events.Append(
        events_pb2.AppendRequest(events=[event("shared-id")]), metadata=tenant_metadata(b)
    )
    assert stored_b.appended == 1
    read_b = await events.Read(events_pb2.ReadRequest(), metadata=tenant_metadata(b))
    assert len(read_b.events) == 1


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (event(""), "events[0].event_id"),
        (event("x", type="teleport"), "events[0].type"),
        (event("x", user_id=""), "events[0].user_id"),
        (event("x", ts_ms=0), "events[0].ts"),
        (event("x", propensity=1.5), "events[0].propensity"),
        (event("x", request_id="r" * 129), "events[0].request_id"),
        (event("x", support=[1, 2]), "events[0].support"),  # a click has no support
        (event("x", type="impression", support=[1, -2]), "events[0].support"),
        (event("x", type="impression", support=range(4097)), "events[0].support"),
        # attributes are bounded for every event, as a catalog item's are (64 of 1 KiB)
        (event("x", attributes={str(i): "" for i in range(65)}), "events[0].attributes"),
        (event("x", attributes={"k": "v" * 1025}), "events[0].attributes"),
        (event("x", attributes={"k" * 1025: "v"}), "events[0].attributes"),
    ],
)
async def test_invalid_event_rejects_the_batch(
    events: events_pb2_grpc.EventServiceAsyncStub, bad: events_pb2.Event, field: str
) -> None:
    tenant = "ev" + uuid.uuid4().hex[:8]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await events.Append(
            events_pb2.AppendRequest(events=[bad]), metadata=tenant_metadata(tenant)
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", field) in tuple(error.value.trailing_metadata() or ())
    refused = {"tenant": tenant, "outcome": "refused", "field": field.rsplit(".", 1)[-1]}
    assert REGISTRY.get_sample_value("recmesh_events_appends_total", refused) == 1.0
    reply = await events.Read(events_pb2.ReadRequest(), metadata=tenant_metadata(tenant))
    assert list(reply.events) == []


async def test_a_requests_events_are_read_back_once_each_and_only_by_its_tenant(
    events: events_pb2_grpc.EventServiceAsyncStub,
) -> None:
    tenant, other = "ev" + uuid.uuid4().hex[:8], "ev" + uuid.uuid4().hex[:8]
    batch = [
        event("imp-0", type="impression", request_id="req-1", position=0),
        event("imp-1", type="impression", request_id="req-1", position=1),
        event("other", type="impression", request_id="req-2"),
        event("no-request"),
        event("click-1", request_id="req-1", item_id=3),
    ]
    await events.Append(events_pb2.AppendRequest(events=batch), metadata=tenant_metadata(tenant))
    again = await events.Append(  # a redelivery is not indexed twice
        events_pb2.AppendRequest(events=batch[:2]), metadata=tenant_metadata(tenant)
    )
    assert again.duplicates == 2

    async def ask(request_id: str, who: str) -> list[str]:
        reply = await events.ReadRequestEvents(
            events_pb2.ReadRequestEventsRequest(request_id=request_id),
            metadata=tenant_metadata(who),
        )
        return [e.event.event_id for e in reply.events]

    assert await ask("req-1", tenant) == ["imp-0", "imp-1", "click-1"]
    assert await ask("req-1", other) == []
    assert await ask("req-9", tenant) == []


@pytest.mark.parametrize("request_id", ["", "r" * 129])
async def test_reading_a_request_needs_a_valid_request_id(
    events: events_pb2_grpc.EventServiceAsyncStub, request_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await events.ReadRequestEvents(
            events_pb2.ReadRequestEventsRequest(request_id=request_id),
            metadata=tenant_metadata("demo"),
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", "request_id") in tuple(error.value.trailing_metadata() or ())


async def test_a_requests_index_is_capped_and_its_expiry_is_not_extended(
    redis_url: str,
) -> None:
    client = mesh_redis.client(redis_url)
    try:
        log = RedisStreamEventLog(client, dedupe_ttl_s=100, request_cap=3)
        name = "ev" + uuid.uuid4().hex[:8]
        await log.append(name, [event(f"a{i}", request_id="same") for i in range(2)])
        await client.expire(keys.request_events(name, "same"), 50)
        await log.append(name, [event(f"b{i}", request_id="same") for i in range(3)])
        indexed = await log.read_request(name, "same", 10)
        assert [e.event_id for _, e in indexed] == ["a0", "a1", "b0"]
        assert 0 < await client.ttl(keys.request_events(name, "same")) <= 50
    finally:
        await client.aclose()
