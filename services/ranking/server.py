"""Composition root of the ranking service."""

from __future__ import annotations

from pathlib import Path

from recmesh.feature.v1 import feature_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from core.artifacts import resolve_current
from mesh.client import Downstream
from mesh.server import MeshServer, Registration
from mesh.settings import load
from services.ranking.models import RankingModels
from services.ranking.servicer import RankingServicer
from services.ranking.settings import RankingSettings
from services.runtime.artifact_watch import ArtifactWatcher, ArtifactWatchSettings
from services.runtime.models import artifacts_check


async def build_server(
    settings: RankingSettings, watch: ArtifactWatchSettings | None = None
) -> MeshServer:
    """Ranking serving the artifact set under ``settings.artifacts``/current.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: the head weights name a head the ranker does not have.
    """
    server, _ = await build_service(settings, watch)
    return server


async def build_service(
    settings: RankingSettings, watch: ArtifactWatchSettings | None = None
) -> tuple[MeshServer, ArtifactWatcher[RankingModels]]:
    """:func:`build_server` and the watcher that swaps in each new ``current``.

    ``watch`` defaults to the environment (``RECMESH_ARTIFACT_POLL_S``); see
    :mod:`services.runtime.artifact_watch`.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: the head weights name a head the ranker does not have.
    """
    watch = watch if watch is not None else load(ArtifactWatchSettings)
    models = RankingModels(resolve_current(settings.artifacts), settings.head_weights)
    models.warm_up(settings.prerank_keep)
    features = Downstream.open(
        "feature", settings.feature_addr, feature_pb2_grpc.FeatureServiceStub
    )
    servicer = RankingServicer(models, features, settings)

    def load_candidate(path: Path, served: RankingModels) -> RankingModels:
        return RankingModels.replacing(path, served, settings.head_weights, settings.prerank_keep)

    def install(candidate: RankingModels) -> None:
        servicer.models = candidate

    watcher = ArtifactWatcher(
        service=settings.service_name,
        root=settings.artifacts,
        served=models,
        load=load_candidate,
        install=install,
        poll_s=watch.poll_s,
    )
    return MeshServer(
        settings,
        [Registration.of(servicer, ranking_pb2, ranking_pb2_grpc, "RankingService")],
        checks=[artifacts_check(lambda: watcher.served.path)],
        startups=[features.connect, watcher.start],
        cleanups=[watcher.stop, features.close],
    ), watcher
