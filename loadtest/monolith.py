"""``python -m loadtest.monolith``: the whole funnel in one process, the benchmark baseline.

The gateway here is the real gateway (HTTP and gRPC APIs, funnel, fallbacks, outbox,
relay) and its downstreams are the real servicers of every service, called in-process
through :func:`mesh.local.local_stub` instead of over gRPC: same artifacts, same Redis,
same code, no RPC hops. Comparing it with the mesh at the same load measures what the
hops cost (``python -m loadtest.steps --target both``).

It reads the environment the mesh processes read (``ops.supervisor.Layout.env()``):
``REDIS_URL``, ``RECMESH_ARTIFACTS``, ``RECMESH_TENANTS``, ``RECMESH_EXPERIMENTS``, the
gateway's ports and outbox. At start it prepares Redis scripts and stream groups and
materialises every tenant's features, then answers on the gateway's HTTP port and
reports SERVING on the gateway's gRPC health; SIGTERM drains and stops it. Artifact hot
swap is not wired: a new ``current`` needs a restart.
"""

from __future__ import annotations

import asyncio
from functools import partial

from core.artifacts import resolve_current
from core.experiments.book import load_experiments
from gateway.clients import Downstreams
from gateway.server import build_gateway
from gateway.settings import GatewaySettings
from mesh import redis as mesh_redis
from mesh.client import Downstream
from mesh.local import local_stub
from mesh.runner import run_service
from mesh.server import MeshServer
from mesh.settings import load
from mesh.tenants import load_tenants
from services.events.log import RedisStreamEventLog
from services.events.servicer import EventServicer
from services.events.settings import EventsSettings
from services.experiment.servicer import ExperimentServicer
from services.experiment.settings import ExperimentSettings
from services.feature.materialize import Materializer
from services.feature.servicer import FeatureServicer
from services.feature.settings import FeatureSettings
from services.feature.store import RedisFeatureStore
from services.quota.limiter import RedisRateLimiter
from services.quota.servicer import QuotaServicer
from services.quota.settings import QuotaSettings
from services.ranking.models import RankingModels
from services.ranking.servicer import RankingServicer
from services.ranking.settings import RankingSettings
from services.retrieval.index import RetrievalModels
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings


async def _materialize(materializer: Materializer, tenants: list[str]) -> None:
    for tenant in tenants:
        await materializer.materialize(tenant, force=False)


async def build_monolith(settings: GatewaySettings) -> MeshServer:
    """The gateway of ``settings`` over in-process servicers of every service.

    Raises:
        ArtifactError: the current artifact set is missing or corrupt.
        ConfigError: the tenant or experiment file is missing or invalid.
    """
    feature = load(FeatureSettings)
    events = load(EventsSettings)
    client = mesh_redis.connect(feature.redis_url)
    tenants = load_tenants(load(QuotaSettings).tenants)

    bulk = mesh_redis.connect_blocking(feature.redis_url)
    store = RedisFeatureStore(client, history_cap=feature.history_cap, bulk=bulk)
    materializer = Materializer(store, feature.artifacts)
    features = Downstream(
        "feature",
        local_stub(FeatureServicer(store, materializer, feature.history_limit, feature.max_batch)),
    )

    retrieval = load(RetrievalSettings)
    retrieval_models = RetrievalModels(resolve_current(retrieval.artifacts))
    retrieval_models.warm_up(retrieval.ann_k)

    ranking = load(RankingSettings)
    ranking_models = RankingModels(resolve_current(ranking.artifacts), ranking.head_weights)
    ranking_models.warm_up(ranking.prerank_keep)

    event_log = RedisStreamEventLog(client, events.dedupe_ttl_s)
    limiter = RedisRateLimiter(client)
    downstreams = Downstreams(
        quota=Downstream("quota", local_stub(QuotaServicer(limiter, tenants))),
        experiment=Downstream(
            "experiment",
            local_stub(ExperimentServicer(load_experiments(load(ExperimentSettings).experiments))),
        ),
        retrieval=Downstream(
            "retrieval", local_stub(RetrievalServicer(retrieval_models, features, retrieval))
        ),
        ranking=Downstream(
            "ranking", local_stub(RankingServicer(ranking_models, features, ranking))
        ),
        events=Downstream("events", local_stub(EventServicer(event_log, events.max_read))),
        feature_channel=None,
    )
    server, _ = await build_gateway(settings, downstreams)
    server.startups[0:0] = [
        limiter.prepare,
        event_log.prepare,
        partial(_materialize, materializer, list(tenants.tenants)),
    ]
    server.cleanups += [client.aclose, lambda: asyncio.to_thread(bulk.close)]
    return server


def main() -> None:
    """Serve the monolith until SIGTERM (settings from the environment, as the gateway)."""
    run_service(build_monolith, GatewaySettings)


if __name__ == "__main__":
    main()
