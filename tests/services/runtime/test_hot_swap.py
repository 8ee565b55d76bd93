"""Retrieval and ranking pick up a new ``current`` under live traffic, refuse bad sets, roll back.

Real servers in-process on port 0, against the session Redis (features materialised from
the session artifact set) and an artifact root of this module's own: the session set copied
(v1) plus a second set trained with another training seed (v2, same world and features).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core.artifacts import MANIFEST, load_artifact_set, resolve_current, rollback, set_current
from mesh.client import open_channel
from mesh.errors import ArtifactError
from mesh.server import MeshServer
from mesh.testing import built_server, serving, tenant_metadata
from services.feature.server import build_service as build_feature
from services.feature.settings import FeatureSettings
from services.ranking.models import RankingModels
from services.ranking.server import build_service as build_ranking
from services.ranking.settings import RankingSettings
from services.retrieval.index import RetrievalModels
from services.retrieval.server import build_service as build_retrieval
from services.retrieval.settings import RetrievalSettings
from services.runtime.artifact_watch import ArtifactWatcher

POLL_S = 0.05
USERS = 500


@dataclass(frozen=True)
class Versions:
    """Two good artifact sets in a staging root: ``v1`` older than ``v2``."""

    staging: Path
    v1: str
    v2: str


@pytest.fixture(scope="module")
def versions(artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Versions:
    from training.pipeline import TrainConfig, train

    staging = tmp_path_factory.mktemp("swap-sets")
    v1 = resolve_current(artifacts_root).name
    shutil.copytree(artifacts_root / v1, staging / v1)
    v2 = train(
        staging,
        TrainConfig(
            n_users=USERS,
            n_items=2000,
            n_categories=20,
            epochs=1,
            train_seed=1,
            evaluate=False,
            progress=False,
        ),
    ).name
    assert v1 < v2
    return Versions(staging, v1, v2)


@pytest.fixture
def root(versions: Versions, tmp_path: Path) -> Path:
    """A fresh artifact root holding v1 and v2, ``current`` -> v1."""
    root = tmp_path / "artifacts"
    root.mkdir()
    for version in (versions.v1, versions.v2):
        shutil.copytree(versions.staging / version, root / version)
    set_current(root, versions.v1)
    return root


@pytest.fixture(scope="module")
async def feature(redis_url: str, artifacts_root: Path) -> AsyncIterator[str]:
    server = await built_server(
        build_feature, FeatureSettings(port=0, redis_url=redis_url, artifacts=artifacts_root)
    )
    async with serving(server):
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
async def tenant(feature: str) -> str:
    name = "swap" + uuid.uuid4().hex[:8]
    channel = open_channel(feature)
    await feature_pb2_grpc.FeatureServiceStub(channel).Materialize(
        feature_pb2.MaterializeRequest(), metadata=tenant_metadata(name), timeout=60
    )
    await channel.close()
    return name


@dataclass
class Stack:
    """Retrieval and ranking on ``root``, with stubs and the watchers."""

    retrieval: ArtifactWatcher[RetrievalModels]
    ranking: ArtifactWatcher[RankingModels]
    retrieve: retrieval_pb2_grpc.RetrievalServiceAsyncStub
    rank: ranking_pb2_grpc.RankingServiceAsyncStub
    servers: list[MeshServer] = field(default_factory=list)


@pytest.fixture
async def stack(root: Path, feature: str, redis_url: str) -> AsyncIterator[Stack]:
    # Every server and client shares this process's one event loop: the 10 ms feature
    # budgets of production would degrade requests for reasons that have nothing to do
    # with the swap (the loop-stall test below measures the swap itself).
    common: dict[str, Any] = {
        "port": 0,
        "drain_delay_s": 0.0,
        "artifacts": root,
        "feature_addr": feature,
        "feature_budget_s": 1.0,
        "artifact_poll_s": POLL_S,
        "tls": False,
    }
    retrieval_settings = RetrievalSettings(redis_url=redis_url, **common)
    ranking_settings = RankingSettings(**common)
    built_retrieval = await build_retrieval(retrieval_settings)
    built_ranking = await build_ranking(ranking_settings)
    retrieval_watch, ranking_watch = built_retrieval.watcher, built_ranking.watcher
    retrieval = MeshServer(retrieval_settings, built_retrieval)
    ranking = MeshServer(ranking_settings, built_ranking)
    # Refused sets are retried quickly here, so a test can repair one and see it taken.
    for watcher in (retrieval_watch, ranking_watch):
        watcher.retry_refused_s = 0.5
        watcher.retire_after_s = 0.1
    async with serving(retrieval), serving(ranking):
        channels = [open_channel(f"127.0.0.1:{s.port}") for s in (retrieval, ranking)]
        yield Stack(
            retrieval_watch,
            ranking_watch,
            retrieval_pb2_grpc.RetrievalServiceStub(channels[0]),
            ranking_pb2_grpc.RankingServiceStub(channels[1]),
            [retrieval, ranking],
        )
        for channel in channels:
            await channel.close()


@dataclass
class Traffic:
    """What concurrent clients saw: (retrieval version, ranking version) per request."""

    seen: list[list[tuple[str, str]]]
    failures: list[str] = field(default_factory=list)

    def last(self) -> set[tuple[str, str]]:
        return {worker[-1] for worker in self.seen if worker}

    @property
    def total(self) -> int:
        return sum(len(worker) for worker in self.seen)


async def one_request(stack: Stack, tenant: str, user: str) -> tuple[str, str]:
    """Retrieve then rank for ``user``; the model versions both answered with."""
    metadata = tenant_metadata(tenant)
    retrieved = await stack.retrieve.Retrieve(
        retrieval_pb2.RetrieveRequest(user_id=user), metadata=metadata, timeout=5
    )
    assert retrieved.candidates.item_ids
    assert "user_features" not in retrieved.degraded
    ranked = await stack.rank.Rank(
        ranking_pb2.RankRequest(
            user_id=user,
            user_features=retrieved.user_features,
            candidates=retrieved.candidates,
            num_items=10,
        ),
        metadata=metadata,
        timeout=5,
    )
    assert len(ranked.ranked.item_ids) == 10
    # Stages may fall back on their latency budgets under this load (the loop is shared);
    # the features must have arrived and been accepted by the models in service.
    assert not {"user_features", "item_features"} & set(ranked.degraded)
    return retrieved.model_version, ranked.model_version


async def with_traffic(
    stack: Stack, tenant: str, during: Callable[[], object], workers: int = 8
) -> Traffic:
    """Run ``workers`` clients looping Retrieve→Rank while ``during()`` is awaited."""
    traffic = Traffic([[] for _ in range(workers)])
    stop = asyncio.Event()

    async def client(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                traffic.seen[n].append(await one_request(stack, tenant, f"u{i % USERS}"))
            except (grpc.aio.AioRpcError, AssertionError) as exc:
                traffic.failures.append(f"{type(exc).__name__}: {exc}")
            i += workers

    def each_did(counts: list[int]) -> Callable[[], bool]:
        return lambda: all(
            len(done) + len(traffic.failures) >= n + 3
            for done, n in zip(traffic.seen, counts, strict=True)
        )

    tasks = [asyncio.create_task(client(n)) for n in range(workers)]
    try:
        await until(each_did([0] * workers))  # every client on the old set first
        result = during()
        if asyncio.iscoroutine(result):
            await result
        await until(each_did([len(done) for done in traffic.seen]))  # and after
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return traffic


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def both_serve(stack: Stack, version: str) -> bool:
    return stack.retrieval.served.version == version and stack.ranking.served.version == version


def both_refused(stack: Stack, version: str) -> bool:
    return all(
        w.refused is not None and w.refused.version == version
        for w in (stack.retrieval, stack.ranking)
    )


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_swap_under_concurrent_requests_fails_none(
    stack: Stack, tenant: str, root: Path, versions: Versions
) -> None:
    assert await one_request(stack, tenant, "u1") == (versions.v1, versions.v1)
    swapped_before = metric("recmesh_artifact_swaps_total", service="ranking", outcome="swapped")

    async def flip() -> None:
        set_current(root, versions.v2)
        await until(lambda: both_serve(stack, versions.v2))

    traffic = await with_traffic(stack, tenant, flip)

    assert traffic.failures == []
    # Every client saw v1 first, then v2, and never v1 again once it had seen v2.
    for worker in traffic.seen:
        retrieval_versions = [r for r, _ in worker]
        ranking_versions = [k for _, k in worker]
        for versions_seen in (retrieval_versions, ranking_versions):
            assert versions_seen[0] == versions.v1
            assert versions_seen[-1] == versions.v2
            first_new = versions_seen.index(versions.v2)
            assert set(versions_seen[first_new:]) == {versions.v2}
    assert await one_request(stack, tenant, "u2") == (versions.v2, versions.v2)
    assert stack.retrieval.swaps == stack.ranking.swaps == 1
    assert stack.retrieval.refused is None
    after = metric("recmesh_artifact_swaps_total", service="ranking", outcome="swapped")
    assert after == (swapped_before or 0) + 1
    assert metric("recmesh_artifact_info", service="retrieval", serving=versions.v2, refused="")


def clone(root: Path, source: str, version: str, tamper: Callable[[Path], None]) -> str:
    """Copy version ``source`` as ``version`` (manifest updated), then ``tamper`` with it."""
    target = root / version
    shutil.copytree(root / source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["version"] = version
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tamper(target)
    return version


def flip_a_byte(directory: Path) -> None:
    path = directory / "ranker.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def delete_index(directory: Path) -> None:
    (directory / "ann.faiss").unlink()


def wider_user_tower(directory: Path) -> None:
    """Replace the user tower by a valid ONNX model that takes 36 user features (not the
    set's width) and re-hash it in the manifest: only the shape check can catch it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(36, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["user_features", "w"], ["user_embedding"])],
        "wider",
        [helper.make_tensor_value_info("user_features", TensorProto.FLOAT, ["batch", 36])],
        [helper.make_tensor_value_info("user_embedding", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = directory / "user_tower.onnx"
    onnx.save(model, str(path))
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"]["user_tower"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.mark.parametrize(
    ("tamper", "file_named", "reason"),
    [
        (flip_a_byte, "ranker.onnx", "does not match its sha256"),
        (delete_index, "ann.faiss", "is missing"),
        (wider_user_tower, "user_tower.onnx", "is 36 wide"),
    ],
    ids=["wrong-hash", "missing-file", "wrong-onnx-input"],
)
async def test_bad_set_is_refused_and_the_old_one_keeps_serving(
    stack: Stack,
    tenant: str,
    root: Path,
    versions: Versions,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[Path], None],
    file_named: str,
    reason: str,
) -> None:
    bad = clone(root, versions.v1, "29990101T000000.000000Z-0badbad0", tamper)
    refused_before = metric("recmesh_artifact_swaps_total", service="retrieval", outcome="refused")

    async def flip() -> None:
        set_current(root, bad)
        await until(lambda: both_refused(stack, bad))

    with caplog.at_level(logging.ERROR, logger="services.runtime.artifact_watch"):
        traffic = await with_traffic(stack, tenant, flip)

    assert traffic.failures == []
    assert {pair for worker in traffic.seen for pair in worker} == {(versions.v1, versions.v1)}
    for watcher in (stack.retrieval, stack.ranking):
        assert watcher.served.version == versions.v1
        assert watcher.refused is not None
        assert file_named in watcher.refused.error
        assert reason in watcher.refused.error
        assert watcher.status()["refused"]["version"] == bad
    refusals = [r for r in caplog.records if getattr(r, "fields", {}).get("refused_version") == bad]
    assert {r.fields["serving_version"] for r in refusals} == {versions.v1}  # type: ignore[attr-defined]
    assert all(file_named in r.getMessage() for r in refusals)
    after = metric("recmesh_artifact_swaps_total", service="retrieval", outcome="refused")
    assert after is not None and after >= (refused_before or 0) + 1
    assert metric("recmesh_artifact_info", service="ranking", serving=versions.v1, refused=bad)
    # Still SERVING: the previous set serves.
    for server in stack.servers:
        assert await server.health.run_checks()
    # A good set made current afterwards is taken.
    set_current(root, versions.v2)
    await until(lambda: both_serve(stack, versions.v2))
    assert await one_request(stack, tenant, "u3") == (versions.v2, versions.v2)


async def test_repaired_set_is_taken_on_retry(
    stack: Stack, tenant: str, root: Path, versions: Versions
) -> None:
    bad = clone(root, versions.v2, "29990101T000000.000000Z-0badbad1", delete_index)
    set_current(root, bad)
    await until(lambda: both_refused(stack, bad))
    shutil.copy(root / versions.v2 / "ann.faiss", root / bad / "ann.faiss")
    await until(lambda: both_serve(stack, bad))
    assert await one_request(stack, tenant, "u4") == (bad, bad)
    assert stack.retrieval.refused is None


async def test_rollback_is_picked_up(
    stack: Stack, tenant: str, root: Path, versions: Versions
) -> None:
    set_current(root, versions.v2)
    await until(lambda: both_serve(stack, versions.v2))

    async def roll_back() -> None:
        assert rollback(root).name == versions.v1
        await until(lambda: both_serve(stack, versions.v1))

    traffic = await with_traffic(stack, tenant, roll_back)

    assert traffic.failures == []
    assert traffic.last() == {(versions.v1, versions.v1)}
    assert stack.retrieval.swaps == stack.ranking.swaps == 2


async def test_loading_a_set_does_not_stall_the_event_loop(
    stack: Stack, root: Path, versions: Versions
) -> None:
    """The ticker measures the longest gap the loop had while both services swapped."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - started - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.2)
    baseline = max(gaps)
    gaps.clear()
    set_current(root, versions.v2)
    await until(lambda: both_serve(stack, versions.v2))
    await asyncio.sleep(0.3)  # the retired set is released during this
    stop.set()
    await task
    assert max(gaps) < max(0.05, 3 * baseline), (max(gaps), baseline)


def test_check_refuses_a_feature_width_change(root: Path, versions: Versions) -> None:
    """A set whose models take other feature widths than the served set cannot replace it."""
    served = RetrievalModels(root / versions.v1)
    width = served.user_dim
    served.user_dim += 1  # as if the feature store held wider rows
    with pytest.raises(ArtifactError, match=rf"user_tower\.onnx: takes user features {width} wide"):
        RetrievalModels.replacing(root / versions.v2, served, 10)
    ranking = RankingModels(root / versions.v1, "click=1")
    item_width = ranking.item_dim
    ranking.item_dim -= 1
    with pytest.raises(
        ArtifactError, match=rf"ranker\.onnx: takes item features {item_width} wide"
    ):
        RankingModels.replacing(root / versions.v2, ranking, "click=1", 10)
    assert load_artifact_set(root / versions.v2).version == versions.v2
