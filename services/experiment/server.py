"""Composition root of the experiment service."""

from __future__ import annotations

from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.book import load_experiments
from mesh.server import MeshServer, Registration
from services.experiment.servicer import ExperimentServicer
from services.experiment.settings import ExperimentSettings


async def build_server(settings: ExperimentSettings) -> MeshServer:
    """The experiment service assigning from ``settings.experiments``.

    Raises:
        ConfigError: the experiment book is missing or invalid.
    """
    servicer = ExperimentServicer(load_experiments(settings.experiments))
    return MeshServer(
        settings,
        [Registration.of(servicer, experiment_pb2, experiment_pb2_grpc, "ExperimentService")],
    )
