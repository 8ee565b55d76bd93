"""Composition root of the experiment service."""

from __future__ import annotations

from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.book import load_experiments
from mesh.service import Registration, Service
from services.experiment.reports import Reports
from services.experiment.servicer import ExperimentServicer
from services.experiment.settings import ExperimentSettings


async def build_service(settings: ExperimentSettings) -> Service:
    """The experiment service assigning from ``settings.experiments`` and reporting from
    the event logs in Redis at ``settings.redis_url`` (in a worker process started at the
    first report). Redis is not a health dependency: assignment does not read it.

    Raises:
        ConfigError: the experiment book is missing or invalid.
    """
    reports = Reports(settings.redis_url, settings.report_page)
    servicer = ExperimentServicer(load_experiments(settings.experiments), reports)
    return Service(
        [Registration.of(servicer, experiment_pb2, experiment_pb2_grpc, "ExperimentService")],
        cleanups=[reports.close],
    )
