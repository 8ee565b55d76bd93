"""Composition root of the retrieval service."""

from __future__ import annotations

from pathlib import Path

from recmesh.feature.v1 import feature_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from core.artifacts import resolve_current
from mesh.client import Downstream
from mesh.server import MeshServer, Registration
from mesh.settings import load
from services.retrieval.index import RetrievalModels
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from services.runtime.artifact_watch import ArtifactWatcher, ArtifactWatchSettings
from services.runtime.models import artifacts_check


async def build_server(
    settings: RetrievalSettings, watch: ArtifactWatchSettings | None = None
) -> MeshServer:
    """Retrieval serving the artifact set under ``settings.artifacts``/current.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
    """
    server, _ = await build_service(settings, watch)
    return server


async def build_service(
    settings: RetrievalSettings, watch: ArtifactWatchSettings | None = None
) -> tuple[MeshServer, ArtifactWatcher[RetrievalModels]]:
    """:func:`build_server` and the watcher that swaps in each new ``current``.

    ``watch`` defaults to the environment (``RECMESH_ARTIFACT_POLL_S``); see
    :mod:`services.runtime.artifact_watch`.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
    """
    watch = watch if watch is not None else load(ArtifactWatchSettings)
    models = RetrievalModels(resolve_current(settings.artifacts))
    models.warm_up(settings.ann_k)
    features = Downstream.open(
        "feature", settings.feature_addr, feature_pb2_grpc.FeatureServiceStub
    )
    servicer = RetrievalServicer(models, features, settings)

    def load_candidate(path: Path, served: RetrievalModels) -> RetrievalModels:
        return RetrievalModels.replacing(path, served, settings.ann_k)

    def install(candidate: RetrievalModels) -> None:
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
        [Registration.of(servicer, retrieval_pb2, retrieval_pb2_grpc, "RetrievalService")],
        checks=[artifacts_check(lambda: watcher.served.path)],
        startups=[features.connect, watcher.start],
        cleanups=[watcher.stop, features.close],
    ), watcher
