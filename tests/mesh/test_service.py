"""A built service's lifecycle as a server runs it, and a monolith's embedded services."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.book import ExperimentBook
from mesh.health import HealthCheck
from mesh.server import MeshServer
from mesh.service import Hook, Registration, Service
from mesh.settings import ServerSettings
from mesh.testing import channel_to, serving
from services.experiment.servicer import ExperimentServicer


def recorder(log: list[str], name: str) -> Hook:
    async def hook() -> None:
        log.append(name)

    return hook


def service(log: list[str], name: str) -> Service:
    return Service(
        [],
        startups=[recorder(log, f"start {name}")],
        drains=[recorder(log, f"drain {name}")],
        cleanups=[recorder(log, f"clean {name}")],
    )


async def test_embedded_services_start_first_and_are_cleaned_up_last_in_reverse() -> None:
    log: list[str] = []
    outer = service(log, "gateway")
    outer.embed(service(log, "feature"), service(log, "ranking"))
    server = MeshServer(ServerSettings(port=0, drain_delay_s=0.0, tls=False), outer)
    async with serving(server):
        assert log == ["start feature", "start ranking", "start gateway"]
    assert log[3:] == [
        "drain gateway",
        "drain feature",
        "drain ranking",
        "clean gateway",
        "clean ranking",
        "clean feature",
    ]


async def test_an_embedded_service_failing_its_check_makes_the_host_not_serving() -> None:
    async def down() -> None:
        raise ConnectionError("redis is down")

    outer = Service([])
    outer.embed(Service([], checks=[HealthCheck("redis", down)]))
    server = MeshServer(ServerSettings(port=0, drain_delay_s=0.0, tls=False), outer)
    async with serving(server), channel_to(server) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.health.failures == {"redis": "ConnectionError: redis is down"}


def test_servicer_is_found_by_short_or_full_service_name() -> None:
    servicer = ExperimentServicer(ExperimentBook((), "0" * 16))
    built = Service(
        [Registration.of(servicer, experiment_pb2, experiment_pb2_grpc, "ExperimentService")]
    )
    assert built.servicer("ExperimentService") is servicer
    assert built.servicer("recmesh.experiment.v1.ExperimentService") is servicer
    with pytest.raises(KeyError, match="RankingService"):
        built.servicer("RankingService")
