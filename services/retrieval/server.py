"""Composition root of the retrieval service."""

from __future__ import annotations

from functools import partial

from recmesh.feature.v1 import feature_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from mesh.client import connect_eagerly, open_channel
from mesh.server import MeshServer, Registration
from services.models import artifacts_check
from services.retrieval.index import RetrievalModels
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from training.artifacts import resolve_current


async def build_server(settings: RetrievalSettings) -> MeshServer:
    """Retrieval serving the artifact set under ``settings.artifacts``/current.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
    """
    version_dir = resolve_current(settings.artifacts)
    models = RetrievalModels(version_dir)
    models.warm_up(settings.ann_k)
    channel = open_channel(settings.feature_addr)
    servicer = RetrievalServicer(models, feature_pb2_grpc.FeatureServiceStub(channel), settings)
    return MeshServer(
        settings,
        [Registration.of(servicer, retrieval_pb2, retrieval_pb2_grpc, "RetrievalService")],
        checks=[artifacts_check(version_dir)],
        startups=[partial(connect_eagerly, [channel])],
        cleanups=[channel.close],
    )
