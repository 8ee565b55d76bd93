"""The gateway's downstream stubs, one channel per service."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.events.v1 import events_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2_grpc
from recmesh.quota.v1 import quota_pb2_grpc
from recmesh.ranking.v1 import ranking_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2_grpc

from gateway.settings import GatewaySettings
from mesh.client import connect_eagerly, open_channel


@dataclass
class Downstreams:
    """Stubs of every service the gateway calls, and their channels for health and close."""

    channels: dict[str, grpc.aio.Channel]
    quota: quota_pb2_grpc.QuotaServiceAsyncStub
    experiment: experiment_pb2_grpc.ExperimentServiceAsyncStub
    retrieval: retrieval_pb2_grpc.RetrievalServiceAsyncStub
    ranking: ranking_pb2_grpc.RankingServiceAsyncStub
    events: events_pb2_grpc.EventServiceAsyncStub

    @classmethod
    def open(cls, settings: GatewaySettings) -> Downstreams:
        """Open channels to every address in ``settings`` (inside the running loop)."""
        channels = {
            name: open_channel(getattr(settings, f"{name}_addr"))
            for name in ("feature", "quota", "experiment", "retrieval", "ranking", "events")
        }
        return cls(
            channels=channels,
            quota=quota_pb2_grpc.QuotaServiceStub(channels["quota"]),
            experiment=experiment_pb2_grpc.ExperimentServiceStub(channels["experiment"]),
            retrieval=retrieval_pb2_grpc.RetrievalServiceStub(channels["retrieval"]),
            ranking=ranking_pb2_grpc.RankingServiceStub(channels["ranking"]),
            events=events_pb2_grpc.EventServiceStub(channels["events"]),
        )

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
