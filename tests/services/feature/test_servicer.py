"""Feature service against a real Redis, started in-process on port 0."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core.artifacts import load_artifact_set, resolve_current
from mesh import redis as mesh_redis
from mesh.errors import InvalidArgument
from mesh.server import MeshServer
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.feature.server import build_service
from services.feature.settings import FeatureSettings
from services.feature.store import RedisFeatureStore


@pytest.fixture(scope="module")
async def server(redis_url: str, artifacts_root: Path) -> AsyncIterator[MeshServer]:
    built = await built_server(
        build_service, FeatureSettings(port=0, redis_url=redis_url, artifacts=artifacts_root)
    )
    async with serving(built):
        yield built


@pytest.fixture(scope="module")
async def stub(server: MeshServer) -> AsyncIterator[feature_pb2_grpc.FeatureServiceAsyncStub]:
    async with channel_to(server) as channel:
        yield feature_pb2_grpc.FeatureServiceStub(channel)


async def fresh_tenant(stub: feature_pb2_grpc.FeatureServiceAsyncStub) -> str:
    tenant = "t" + uuid.uuid4().hex[:12]
    await stub.Materialize(feature_pb2.MaterializeRequest(), metadata=tenant_metadata(tenant))
    return tenant


async def test_materialize_is_idempotent(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub, artifacts_root: Path
) -> None:
    tenant = await fresh_tenant(stub)
    again = await stub.Materialize(
        feature_pb2.MaterializeRequest(), metadata=tenant_metadata(tenant)
    )
    assert not again.loaded
    assert again.version == load_artifact_set(resolve_current(artifacts_root)).version
    views = await stub.DescribeViews(
        feature_pb2.DescribeViewsRequest(), metadata=tenant_metadata(tenant)
    )
    assert {v.name for v in views.views} == {"user", "item"}


async def test_user_rows_match_the_artifacts(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub, artifacts_root: Path
) -> None:
    tenant = await fresh_tenant(stub)
    artifacts = load_artifact_set(resolve_current(artifacts_root))
    users = np.load(artifacts.file("user_features"))
    history = np.load(artifacts.file("user_history"))
    reply = await stub.GetUserFeatures(
        feature_pb2.GetUserFeaturesRequest(user_id="u3", history_limit=1000),
        metadata=tenant_metadata(tenant),
    )
    assert not reply.is_default
    np.testing.assert_array_equal(np.frombuffer(reply.features, "<f4"), users[3])
    expected = history["items"][history["indptr"][3] : history["indptr"][4]]
    assert list(reply.history) == expected[-1000:].tolist()


async def test_unknown_user_gets_flagged_defaults(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub,
) -> None:
    tenant = await fresh_tenant(stub)
    reply = await stub.GetUserFeatures(
        feature_pb2.GetUserFeaturesRequest(user_id="nobody"), metadata=tenant_metadata(tenant)
    )
    assert reply.is_default
    assert len(reply.features) == reply.dim * 4 and reply.dim > 0


async def test_item_batch_in_request_order_with_missing_flagged(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub, artifacts_root: Path
) -> None:
    tenant = await fresh_tenant(stub)
    artifacts = load_artifact_set(resolve_current(artifacts_root))
    items = np.load(artifacts.file("item_features"))
    categories = np.load(artifacts.file("item_categories"))
    ids = [5, 10**9, 2, 0]
    reply = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(item_ids=ids), metadata=tenant_metadata(tenant)
    )
    matrix = np.frombuffer(reply.features.values, "<f4").reshape(
        reply.features.rows, reply.features.dim
    )
    np.testing.assert_array_equal(matrix[[0, 2, 3]], items[[5, 2, 0]])
    assert list(reply.categories) == [categories[5], -1, categories[2], categories[0]]
    assert list(reply.missing_item_ids) == [10**9]


async def test_writes_are_visible_only_to_their_tenant(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub,
) -> None:
    owner, other = await fresh_tenant(stub), await fresh_tenant(stub)
    probe = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(item_ids=[1]), metadata=tenant_metadata(owner)
    )
    dim = probe.features.dim
    row = np.full((1, dim), 7.0, dtype="<f4")
    await stub.WriteItemFeatures(
        feature_pb2.WriteItemFeaturesRequest(
            item_ids=[1],
            features=common_pb2.FeatureMatrix(rows=1, dim=dim, values=row.tobytes()),
            categories=[3],
        ),
        metadata=tenant_metadata(owner),
    )
    mine = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(item_ids=[1]), metadata=tenant_metadata(owner)
    )
    theirs = await stub.GetItemFeatures(
        feature_pb2.GetItemFeaturesRequest(item_ids=[1]), metadata=tenant_metadata(other)
    )
    assert np.frombuffer(mine.features.values, "<f4").tolist() == [7.0] * dim
    assert list(mine.categories) == [3]
    assert np.frombuffer(theirs.features.values, "<f4").tolist() != [7.0] * dim

    # The write is an item change of its tenant only; the bulk load (Materialize) is none.
    changes = await stub.GetItemChanges(
        feature_pb2.GetItemChangesRequest(), metadata=tenant_metadata(owner)
    )
    assert list(changes.item_ids) == [1] and changes.as_of_ms > 0
    none = await stub.GetItemChanges(
        feature_pb2.GetItemChangesRequest(), metadata=tenant_metadata(other)
    )
    assert (list(none.item_ids), none.as_of_ms) == ([], 0)
    # Read again from the last one's time: the write of that ms comes again, nothing older.
    again = await stub.GetItemChanges(
        feature_pb2.GetItemChangesRequest(since_ms=changes.as_of_ms),
        metadata=tenant_metadata(owner),
    )
    assert list(again.item_ids) == [1] and again.as_of_ms == changes.as_of_ms
    later = await stub.GetItemChanges(
        feature_pb2.GetItemChangesRequest(since_ms=changes.as_of_ms + 1),
        metadata=tenant_metadata(owner),
    )
    assert (list(later.item_ids), later.as_of_ms) == ([], changes.as_of_ms + 1)


async def test_a_page_of_item_changes_never_splits_one_millisecond(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub,
) -> None:
    tenant = await fresh_tenant(stub)
    metadata = tenant_metadata(tenant)
    dim = (
        await stub.GetItemFeatures(
            feature_pb2.GetItemFeaturesRequest(item_ids=[1]), metadata=metadata
        )
    ).features.dim

    async def write(ids: list[int]) -> None:
        rows = np.zeros((len(ids), dim), dtype="<f4")
        await stub.WriteItemFeatures(
            feature_pb2.WriteItemFeaturesRequest(
                item_ids=ids,
                features=common_pb2.FeatureMatrix(rows=len(ids), dim=dim, values=rows.tobytes()),
                categories=[0] * len(ids),
            ),
            metadata=metadata,
        )

    await write([1, 2, 3, 4, 5])  # one write: five changes of one millisecond
    await asyncio.sleep(0.005)
    await write([9])
    pages: list[list[int]] = []
    since = 0
    for _ in range(5):
        page = await stub.GetItemChanges(
            feature_pb2.GetItemChangesRequest(since_ms=since, with_state=True, limit=2),
            metadata=metadata,
        )
        pages.append(sorted(page.item_ids))
        if not page.more:
            break
        since = page.as_of_ms + 1
    # The first page holds all five (more than the limit), then the later one: every change
    # is read once, and paging ends (it used to repeat the first two forever).
    assert pages == [[1, 2, 3, 4, 5], [9]]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (feature_pb2.GetUserFeaturesRequest(user_id=""), "user_id"),
        (feature_pb2.GetUserFeaturesRequest(user_id="u" * 129), "user_id"),
        (feature_pb2.GetUserFeaturesRequest(user_id="u1", history_limit=-1), "history_limit"),
    ],
)
async def test_bad_user_requests_are_invalid_argument(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub,
    request_: feature_pb2.GetUserFeaturesRequest,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetUserFeatures(request_, metadata=tenant_metadata("demo"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-recmesh-field", field) in tuple(error.value.trailing_metadata() or ())


async def test_malformed_matrix_and_missing_tenant_are_rejected(
    stub: feature_pb2_grpc.FeatureServiceAsyncStub,
) -> None:
    tenant = await fresh_tenant(stub)
    with pytest.raises(grpc.aio.AioRpcError) as bad_matrix:
        await stub.WriteItemFeatures(
            feature_pb2.WriteItemFeaturesRequest(
                item_ids=[1, 2], features=common_pb2.FeatureMatrix(rows=2, dim=4, values=b"\0" * 7)
            ),
            metadata=tenant_metadata(tenant),
        )
    assert bad_matrix.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as no_tenant:
        await stub.GetUserFeatures(feature_pb2.GetUserFeaturesRequest(user_id="u1"))
    assert no_tenant.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_garbage_bytes_do_not_crash_the_server(
    server: MeshServer, stub: feature_pb2_grpc.FeatureServiceAsyncStub
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        raw: Any = channel.unary_unary("/recmesh.feature.v1.FeatureService/GetUserFeatures")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await raw(b"\xff\xff\xff\xff garbage", metadata=tenant_metadata("demo"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    healthy = await stub.GetUserFeatures(
        feature_pb2.GetUserFeaturesRequest(user_id="u1"),
        metadata=tenant_metadata(await fresh_tenant(stub)),
    )
    assert healthy.dim > 0


async def test_a_tampered_artifact_set_is_refused_naming_the_file(
    redis_url: str, artifacts_root: Path, tmp_path: Path
) -> None:
    version = resolve_current(artifacts_root).resolve()
    root = tmp_path / "artifacts"
    shutil.copytree(version, root / version.name)
    (root / "current").symlink_to(version.name)
    features = load_artifact_set(root / version.name).file("item_features")
    data = bytearray(features.read_bytes())
    data[-1] ^= 0xFF
    features.write_bytes(bytes(data))
    built = await built_server(
        build_service, FeatureSettings(port=0, redis_url=redis_url, artifacts=root)
    )
    async with serving(built), channel_to(built) as channel:
        tampered = feature_pb2_grpc.FeatureServiceStub(channel)
        tenant = "t" + uuid.uuid4().hex[:12]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await tampered.Materialize(
                feature_pb2.MaterializeRequest(), metadata=tenant_metadata(tenant)
            )
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert features.name in (error.value.details() or "")
        views = await tampered.DescribeViews(
            feature_pb2.DescribeViewsRequest(), metadata=tenant_metadata(tenant)
        )
        assert list(views.views) == []  # nothing of the tampered set was loaded


@pytest.mark.parametrize("bulk", [True, False], ids=["blocking-threads", "asyncio"])
async def test_a_bulk_item_load_stores_every_row_and_category(redis_url: str, bulk: bool) -> None:
    client = mesh_redis.connect(redis_url)
    blocking = mesh_redis.connect_blocking(redis_url) if bulk else None
    store = RedisFeatureStore(client, bulk=blocking)
    tenant = "bulk" + uuid.uuid4().hex[:8]
    rng = np.random.default_rng(7)
    n = 2 * RedisFeatureStore.BULK_ROWS + 1234  # both threads, and a partial last round
    rows = rng.standard_normal((n, 6)).astype(np.float32)
    categories = rng.integers(0, 40, n).astype(np.int32)
    await store.set_views(
        tenant,
        version="v1",
        user_default=np.zeros(3, np.float32),
        item_default=np.full(6, 9.0, np.float32),
        users=0,
        items=n,
    )
    assert await store.load_items(tenant, rows, categories) == n
    probe = [0, 1999, 2000, RedisFeatureStore.BULK_ROWS, n - 1, n]  # n: never written
    got = await store.get_items(tenant, probe)
    assert np.array_equal(got.features[:-1], rows[probe[:-1]])
    assert got.categories.tolist() == [*categories[probe[:-1]].tolist(), -1]
    assert got.missing.tolist() == [False] * 5 + [True]
    with pytest.raises(InvalidArgument):
        await store.load_items(tenant, rows[:, :5], categories)
    await client.aclose()
    if blocking is not None:
        blocking.close()
