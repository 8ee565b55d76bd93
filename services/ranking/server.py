"""Composition root of the ranking service."""

from __future__ import annotations

from functools import partial

from recmesh.feature.v1 import feature_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from mesh.client import connect_eagerly, open_channel
from mesh.server import MeshServer, Registration
from services.models import artifacts_check
from services.ranking.models import RankingModels
from services.ranking.servicer import RankingServicer
from services.ranking.settings import RankingSettings
from training.artifacts import resolve_current


async def build_server(settings: RankingSettings) -> MeshServer:
    """Ranking serving the artifact set under ``settings.artifacts``/current.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: the head weights name a head the ranker does not have.
    """
    version_dir = resolve_current(settings.artifacts)
    models = RankingModels(version_dir, settings.head_weights)
    models.warm_up(settings.prerank_keep)
    channel = open_channel(settings.feature_addr)
    servicer = RankingServicer(models, feature_pb2_grpc.FeatureServiceStub(channel), settings)
    return MeshServer(
        settings,
        [Registration.of(servicer, ranking_pb2, ranking_pb2_grpc, "RankingService")],
        checks=[artifacts_check(version_dir)],
        startups=[partial(connect_eagerly, [channel])],
        cleanups=[channel.close],
    )
