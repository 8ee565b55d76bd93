"""A user's features as of a past time, from the event log: real Valkey, real events and
feature services, the real projector's code."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc
import numpy as np
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core import keys
from core.artifacts import load_artifact_set, resolve_current
from mesh import redis as mesh_redis
from mesh.ports import free_port
from mesh.redis import AsyncRedis
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from ops import cli
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from services.feature.server import build_service as build_feature
from services.feature.settings import FeatureSettings
from services.projector import rebuild
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections

CAP = 4
"""History cap of the feature service and the projector alike (small: the tests pass it)."""

USER = "u3"


@dataclass
class Services:
    events: events_pb2_grpc.EventServiceAsyncStub
    features: feature_pb2_grpc.FeatureServiceAsyncStub
    feature_port: int
    categories: np.ndarray


@pytest.fixture(scope="module")
async def services(redis_url: str, artifacts_root: Path) -> AsyncIterator[Services]:
    events_server = await built_server(build_events, EventsSettings(port=0, redis_url=redis_url))
    async with serving(events_server), channel_to(events_server) as events_channel:
        feature_server = await built_server(
            build_feature,
            FeatureSettings(
                port=0,
                redis_url=redis_url,
                artifacts=artifacts_root,
                history_cap=CAP,
                events_addr=f"127.0.0.1:{events_server.port}",
                events_page=3,  # a few events per page: every as-of read pages
            ),
        )
        async with serving(feature_server), channel_to(feature_server) as feature_channel:
            artifacts = load_artifact_set(resolve_current(artifacts_root))
            yield Services(
                events_pb2_grpc.EventServiceStub(events_channel),
                feature_pb2_grpc.FeatureServiceStub(feature_channel),
                feature_server.port,
                np.load(artifacts.file("item_categories")),
            )


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


async def fresh_tenant(services: Services) -> str:
    tenant = "asof" + uuid.uuid4().hex[:8]
    await services.features.Materialize(
        feature_pb2.MaterializeRequest(), metadata=tenant_metadata(tenant)
    )
    return tenant


def now_ms() -> int:
    return int(time.time() * 1000)


def items_of_distinct_categories(categories: np.ndarray, n: int) -> list[int]:
    found: dict[int, int] = {}
    for item, category in enumerate(categories.tolist()):
        found.setdefault(int(category), item)
    assert len(found) >= n
    return list(found.values())[:n]


async def append(services: Services, tenant: str, *events: events_pb2.Event) -> None:
    reply = await services.events.Append(
        events_pb2.AppendRequest(events=list(events)), metadata=tenant_metadata(tenant)
    )
    assert reply.appended == len(events)


def event(kind: str, item: int, ts_ms: int = 0, **fields: object) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=uuid.uuid4().hex,
        type=kind,
        user_id=USER,
        item_id=item,
        ts_ms=ts_ms or now_ms(),
        **fields,  # type: ignore[arg-type]
    )


async def features(
    services: Services, tenant: str, as_of_ms: int = 0
) -> feature_pb2.GetUserFeaturesResponse:
    return await services.features.GetUserFeatures(
        feature_pb2.GetUserFeaturesRequest(user_id=USER, history_limit=1000, as_of_ms=as_of_ms),
        metadata=tenant_metadata(tenant),
    )


async def project(client: AsyncRedis, tenant: str) -> None:
    """Run the projector's code over the tenant's log until it has read it all."""
    reader = StreamProjector(
        client,
        Projections(client, history_cap=CAP, half_life_s=3600.0, applied_ttl_s=600),
        [tenant],
        group="projector",
        consumer="test",
    )
    await reader.prepare()
    while await reader.read_once():
        pass


async def a_moment() -> int:
    """A time strictly between what was appended before and what is appended after."""
    await asyncio.sleep(0.02)
    moment = now_ms()
    await asyncio.sleep(0.02)
    return moment


async def test_as_of_between_two_clicks_sees_only_the_first(services: Services) -> None:
    tenant = await fresh_tenant(services)
    first, second, third = items_of_distinct_categories(services.categories, 3)
    materialised = list((await features(services, tenant)).history)
    before_any = await a_moment()
    await append(services, tenant, event("impression", first), event("click", first))
    cut = await a_moment()
    # Appended after the cut, its client dated it before the cut: the append time decides,
    # so it is not in the answer as of the cut (it was not in the log then).
    await append(services, tenant, event("click", second, ts_ms=cut - 60_000))
    await append(services, tenant, event("conversion", third))

    at_cut = await features(services, tenant, as_of_ms=cut)
    assert list(at_cut.history) == [*materialised, first]
    assert dict(at_cut.category_shares) == {int(services.categories[first]): 1.0}
    assert not at_cut.is_default

    at_start = await features(services, tenant, as_of_ms=before_any)
    assert list(at_start.history) == materialised
    assert dict(at_start.category_shares) == {}

    later = await features(services, tenant, as_of_ms=now_ms())
    assert list(later.history) == [*materialised, first, second, third]
    assert sorted(later.category_shares.values()) == pytest.approx([1 / 3] * 3)


async def test_as_of_now_equals_live_once_the_projector_caught_up(
    services: Services, client: AsyncRedis
) -> None:
    tenant = await fresh_tenant(services)
    a, b, c = items_of_distinct_categories(services.categories, 3)
    unknown = 10**9  # no feature row: in the history, in no category share
    clicks = [a, b, a, c, unknown, a, b]  # more than CAP: the replay caps like the projector
    repeated = event("click", a)
    await append(
        services,
        tenant,
        *(event("impression", item, position=n) for n, item in enumerate((a, b, c))),
        *(event("click", item) for item in clicks),
        event("conversion", c),
        event("dismiss", b),
        repeated,
    )
    await services.events.Append(  # a redelivered id is stored once
        events_pb2.AppendRequest(events=[repeated]), metadata=tenant_metadata(tenant)
    )
    await project(client, tenant)

    live = await features(services, tenant)
    as_of = await features(services, tenant, as_of_ms=now_ms())
    assert list(as_of.history) == list(live.history)
    assert list(live.history)[-CAP:] == [unknown, a, b, c, a][-CAP:]
    assert dict(as_of.category_shares) == dict(live.category_shares)
    expected = {int(services.categories[i]): n / 8 for i, n in ((a, 4), (b, 2), (c, 2))}
    assert dict(live.category_shares) == pytest.approx(expected)
    assert as_of.features == live.features and as_of.is_default == live.is_default


async def test_a_trimmed_log_answers_from_its_snapshot_and_refuses_before_it(
    services: Services, client: AsyncRedis
) -> None:
    tenant = await fresh_tenant(services)
    a, b, c = items_of_distinct_categories(services.categories, 3)
    materialised = list((await features(services, tenant)).history)
    early = await a_moment()
    await append(services, tenant, event("click", a))
    await a_moment()
    await append(services, tenant, event("click", b))
    await project(client, tenant)
    trimmed = await rebuild.trim(client, tenant, now_ms() + 1, "projector", 3600.0, CAP)
    assert trimmed.removed == 2
    taken = int(trimmed.position.split("-")[0])
    after_trim = await a_moment()
    await append(services, tenant, event("click", c))
    await project(client, tenant)

    # The log holds neither click any more: the snapshot does.
    assert list((await features(services, tenant, as_of_ms=after_trim)).history) == (
        [*materialised, a, b]
    )
    live = await features(services, tenant)
    as_of = await features(services, tenant, as_of_ms=now_ms())
    assert list(as_of.history) == list(live.history) == [*materialised, a, b, c]
    assert dict(as_of.category_shares) == dict(live.category_shares)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await features(services, tenant, as_of_ms=early)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(taken) in (error.value.details() or "")


async def test_without_a_snapshot_the_log_answers_from_its_horizon_on(
    services: Services, client: AsyncRedis
) -> None:
    # Entries removed with no snapshot taken (an erasure, say): the log answers from its
    # oldest entry on, and refuses before it.
    tenant = await fresh_tenant(services)
    a, b = items_of_distinct_categories(services.categories, 2)
    materialised = list((await features(services, tenant)).history)
    await append(services, tenant, event("click", a))
    early = await a_moment()
    await append(services, tenant, event("click", b))
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.events(tenant)))
    await client.xdel(keys.events(tenant), entries[0][0])
    horizon = int(entries[1][0].decode().split("-")[0])

    assert list((await features(services, tenant, as_of_ms=now_ms())).history) == (
        [*materialised, b]
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await features(services, tenant, as_of_ms=early)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(horizon) in (error.value.details() or "")


@pytest.mark.parametrize("as_of_ms", [-1, "future"])
async def test_a_future_or_negative_time_is_invalid_argument(
    services: Services, as_of_ms: int | str
) -> None:
    tenant = await fresh_tenant(services)
    when = now_ms() + 60_000 if as_of_ms == "future" else int(as_of_ms)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await features(services, tenant, as_of_ms=when)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", "as_of_ms") in tuple(error.value.trailing_metadata() or ())


async def test_without_the_events_service_as_of_is_unavailable_and_live_still_answers(
    redis_url: str, artifacts_root: Path, services: Services
) -> None:
    tenant = await fresh_tenant(services)
    server = await built_server(
        build_feature,
        FeatureSettings(
            port=0,
            redis_url=redis_url,
            artifacts=artifacts_root,
            events_addr=f"127.0.0.1:{free_port()}",  # nothing listens there
        ),
    )
    async with serving(server), channel_to(server) as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        live = await stub.GetUserFeatures(
            feature_pb2.GetUserFeaturesRequest(user_id=USER), metadata=tenant_metadata(tenant)
        )
        assert live.dim > 0
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.GetUserFeatures(
                feature_pb2.GetUserFeaturesRequest(user_id=USER, as_of_ms=now_ms() - 1000),
                metadata=tenant_metadata(tenant),
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_command_prints_the_features_as_of_a_time_as_json(
    services: Services, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = await fresh_tenant(services)
    first, second = items_of_distinct_categories(services.categories, 2)
    materialised = list((await features(services, tenant)).history)
    await append(services, tenant, event("click", first))
    cut = await a_moment()
    await append(services, tenant, event("click", second))
    at = datetime.fromtimestamp(cut / 1000, UTC).isoformat(timespec="milliseconds")
    monkeypatch.setenv("RECMESH_FEATURE_PORT", str(services.feature_port))
    monkeypatch.setenv("RECMESH_TLS", "off")  # in-process servers: plaintext
    capsys.readouterr()
    argv = ["features", "asof", "--tenant", tenant, "--user", USER, "--at", at]
    assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "tenant": tenant,
        "user_id": USER,
        "as_of": at,
        "as_of_ms": cut,
        "is_default": False,
        "history": [*materialised, first],
        "category_shares": {str(int(services.categories[first])): 1.0},
    }
    assert await asyncio.to_thread(cli.main, argv) == 0
    text = capsys.readouterr().out
    assert f"as of {at}" in text and "is_default       false" in text
    future = datetime.fromtimestamp(now_ms() / 1000 + 3600, UTC).isoformat()
    assert await asyncio.to_thread(cli.main, [*argv[:-1], future]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().out
