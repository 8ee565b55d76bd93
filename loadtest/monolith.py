"""``python -m loadtest.monolith``: the whole funnel in one process, the benchmark baseline.

The gateway here is the real gateway (HTTP and gRPC APIs, funnel, fallbacks, outbox,
relay) and its downstreams are the real servicers of every service, called in-process
through :func:`mesh.local.local_stub` instead of over gRPC: same artifacts, same Redis,
same code, no RPC hops. Every service is built by its own composition root
(``services.<name>.server.build_service``), the one its process uses, and its lifecycle
(start-up steps, health checks, clean-ups, the artifact hot swap) runs inside the
gateway's. Comparing it with the mesh at the same load measures what the
hops cost (``python -m loadtest.steps --target both``).

It reads the environment the mesh processes read (``ops.supervisor.Layout.env()``):
``REDIS_URL``, ``RECMESH_ARTIFACTS``, ``RECMESH_TENANTS``, ``RECMESH_EXPERIMENTS``, the
gateway's ports and outbox. At start it runs every service's start-up steps and materialises
every tenant's features, then answers on the gateway's HTTP port and reports SERVING on
the gateway's gRPC health; SIGTERM drains and stops it.
"""

from __future__ import annotations

from typing import Any

from recmesh.feature.v1 import feature_pb2

from gateway.clients import Downstreams
from gateway.server import build_service as build_gateway
from gateway.settings import GatewaySettings
from mesh.client import Downstream
from mesh.context import tenant_var
from mesh.local import local_stub
from mesh.runner import run_service
from mesh.service import Service
from mesh.settings import load
from mesh.tenants import load_tenants
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from services.experiment.server import build_service as build_experiment
from services.experiment.settings import ExperimentSettings
from services.feature.server import build_service as build_feature
from services.feature.settings import FeatureSettings
from services.quota.server import build_service as build_quota
from services.quota.settings import QuotaSettings
from services.ranking.server import build_service as build_ranking
from services.ranking.settings import RankingSettings
from services.retrieval.server import build_service as build_retrieval
from services.retrieval.settings import RetrievalSettings


def _local(name: str, service: Service, grpc_service: str) -> Downstream[Any]:
    """A guarded downstream that calls ``service``'s servicer in this process."""
    return Downstream(name, local_stub(service.servicer(grpc_service)))


async def build_monolith(settings: GatewaySettings) -> Service:
    """The gateway of ``settings`` over in-process servicers of every service.

    Each service reads its own settings from the environment, as its process would.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: the tenant or experiment file is missing or invalid.
    """
    events = await build_events(load(EventsSettings))
    feature = await build_feature(
        load(FeatureSettings), events=_local("events", events, "EventService")
    )
    features = _local("feature", feature, "FeatureService")
    retrieval = await build_retrieval(load(RetrievalSettings), features)
    ranking = await build_ranking(load(RankingSettings), features)
    experiment = await build_experiment(load(ExperimentSettings))
    quota = await build_quota(load(QuotaSettings))
    downstreams = Downstreams(
        quota=_local("quota", quota, "QuotaService"),
        experiment=_local("experiment", experiment, "ExperimentService"),
        retrieval=_local("retrieval", retrieval, "RetrievalService"),
        ranking=_local("ranking", ranking, "RankingService"),
        events=_local("events", events, "EventService"),
        feature=features,
    )
    gateway = await build_gateway(settings, downstreams)
    tenants = list(load_tenants(settings.tenants).tenants)

    async def materialize() -> None:
        # What `recmesh up` asks the feature service for once every service is up.
        for tenant in tenants:
            token = tenant_var.set(tenant)
            try:
                await features.stub.Materialize(feature_pb2.MaterializeRequest(), timeout=600)
            finally:
                tenant_var.reset(token)

    services = (feature, retrieval, ranking, experiment, events, quota)
    gateway.embed(*services, Service([], startups=[materialize]))
    return gateway


def main() -> None:
    """Serve the monolith until SIGTERM (settings from the environment, as the gateway)."""
    run_service(build_monolith, GatewaySettings)


if __name__ == "__main__":
    main()
