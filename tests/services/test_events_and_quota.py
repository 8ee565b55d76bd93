"""Events and quota services against a real Redis, in-process on port 0."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from tests.inprocess import reset_quota, write_tenants


@pytest.fixture(scope="module")
async def events(redis_url: str) -> AsyncIterator[events_pb2_grpc.EventServiceAsyncStub]:
    server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(server), channel_to(server) as channel:
        yield events_pb2_grpc.EventServiceStub(channel)


@pytest.fixture(scope="module")
async def quota_channel(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[grpc.aio.Channel]:
    tenants = write_tenants(tmp_path_factory.mktemp("quota") / "tenants.json")
    server = await built_server(
        build_quota, QuotaSettings(port=0, redis_url=redis_url, tenants=tenants)
    )
    async with serving(server), channel_to(server) as channel:
        yield channel


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
    reply = await events.Read(events_pb2.ReadRequest(), metadata=tenant_metadata(tenant))
    assert list(reply.events) == []


async def test_quota_allows_the_burst_then_rejects_with_retry_after(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    stub = quota_pb2_grpc.QuotaServiceStub(quota_channel)
    decisions = [await stub.Acquire(quota_pb2.AcquireRequest(tenant="tiny")) for _ in range(4)]
    allowed = [d.allowed for d in decisions]
    assert allowed[:2] == [True, True] and not any(allowed[2:])
    assert 0 < decisions[-1].retry_after_s <= 2.0
    usage = await stub.GetUsage(quota_pb2.GetUsageRequest(tenant="tiny"))
    assert usage.usage[0].rejected >= 2


async def test_envoy_rls_shares_the_tenant_bucket(
    quota_channel: grpc.aio.Channel, redis_url: str
) -> None:
    await reset_quota(redis_url, "tiny")
    rls = rls_pb2_grpc.RateLimitServiceStub(quota_channel)
    descriptor = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="tenant", value="tiny")]
    )
    request = rls_pb2.RateLimitRequest(domain="recmesh", descriptors=[descriptor])
    codes = [(await rls.ShouldRateLimit(request)).overall_code for _ in range(3)]
    assert codes == [
        rls_pb2.RateLimitResponse.OK,
        rls_pb2.RateLimitResponse.OK,
        rls_pb2.RateLimitResponse.OVER_LIMIT,
    ]
    unconfigured = rls_pb2.RateLimitRequest(
        domain="recmesh",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key="path", value="/x")]
            )
        ],
    )
    assert (await rls.ShouldRateLimit(unconfigured)).overall_code == rls_pb2.RateLimitResponse.OK
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await rls.ShouldRateLimit(rls_pb2.RateLimitRequest(domain="other"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_tenant_quota_is_not_found(quota_channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await quota_pb2_grpc.QuotaServiceStub(quota_channel).Acquire(
            quota_pb2.AcquireRequest(tenant="ghost")
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
