"""The gateway's downstream services, one guarded channel each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.events.v1 import events_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2_grpc
from recmesh.feature.v1 import feature_pb2_grpc
from recmesh.quota.v1 import quota_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2_grpc

from gateway.settings import GatewaySettings
from mesh.client import Downstream, connect_eagerly
from mesh.tls import Transport

StubT = TypeVar("StubT")


@dataclass
class Downstreams:
    """Every service the gateway calls, each behind its breaker, retry budget and bulkhead.

    The gateway calls the feature service only off the request path (the catalog's item
    width, ``gateway.catalog``) or on a path that is degraded already (the popular
    fallback's withdrawn check, ``gateway.fallback``). In-process downstreams (the monolith
    baseline) have no channel and no health entry.
    """

    quota: Downstream[quota_pb2_grpc.QuotaServiceAsyncStub]
    experiment: Downstream[experiment_pb2_grpc.ExperimentServiceAsyncStub]
    retrieval: Downstream[retrieval_pb2_grpc.RetrievalServiceAsyncStub]
    ranking: Downstream[ranking_pb2_grpc.RankingServiceAsyncStub]
    events: Downstream[events_pb2_grpc.EventServiceAsyncStub]
    feature: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub]

    @classmethod
    def open(cls, settings: GatewaySettings) -> Downstreams:
        """Open channels to every address in ``settings`` (inside the running loop), over
        the gateway's transport (mTLS as ``gateway`` unless ``RECMESH_TLS=off``)."""
        tls = Transport.of(settings)

        def open_one(
            name: str, stub_factory: Callable[[grpc.aio.Channel], StubT]
        ) -> Downstream[StubT]:
            address: str = getattr(settings, f"{name}_addr")
            return Downstream.open(
                name, address, stub_factory, transport=tls, pipe=settings.piped(name)
            )

        return cls(
            quota=open_one("quota", quota_pb2_grpc.QuotaServiceStub),
            experiment=open_one("experiment", experiment_pb2_grpc.ExperimentServiceStub),
            retrieval=open_one("retrieval", retrieval_pb2_grpc.RetrievalServiceStub),
            ranking=open_one("ranking", ranking_pb2_grpc.RankingServiceStub),
            events=open_one("events", events_pb2_grpc.EventServiceStub),
            feature=open_one("feature", feature_pb2_grpc.FeatureServiceStub),
        )

    @property
    def channels(self) -> dict[str, grpc.aio.Channel]:
        """Every downstream's channel by service name (in-process ones have none)."""
        guarded = (
            self.quota,
            self.experiment,
            self.retrieval,
            self.ranking,
            self.events,
            self.feature,
        )
        return {d.name: d.channel for d in guarded if d.channel is not None}

    async def connect(self) -> None:
        """Open every channel now (start-up), so first requests do not pay for connecting."""
        await connect_eagerly(list(self.channels.values()))

    async def health(self, timeout_s: float = 0.5) -> dict[str, str]:
        """Each downstream's ``grpc.health.v1`` status name, or the error reaching it."""

        async def check(channel: grpc.aio.Channel) -> str:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                return f"UNREACHABLE ({exc.code().name})"
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        statuses = await asyncio.gather(*(check(c) for c in self.channels.values()))
        return dict(zip(self.channels, statuses, strict=True))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
