"""The shared runtime: settings, budgets, error mapping, health and drain."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from mesh.context import Budget, clamp_deadline
from mesh.errors import ConfigError, DeadlineExceeded
from mesh.health import HealthCheck
from mesh.runner import freeze_heap, run_loop
from mesh.settings import ServerSettings, env, load
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

PROJECT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Example(ServerSettings):
    size: int = env("EXAMPLE_SIZE", 3)
    ratio: float = env("EXAMPLE_RATIO", 0.5)
    enabled: bool = env("EXAMPLE_ENABLED", False)


def test_settings_read_env_with_defaults_in_one_place() -> None:
    settings = load(Example, {"EXAMPLE_SIZE": "7", "EXAMPLE_ENABLED": "yes"})
    assert (settings.size, settings.ratio, settings.enabled) == (7, 0.5, True)


def test_a_bad_setting_fails_fast_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="EXAMPLE_SIZE"):
        load(Example, {"EXAMPLE_SIZE": "many"})


def test_no_deadline_gets_the_default_and_huge_ones_are_clamped() -> None:
    assert clamp_deadline(None, 0.1, 1.0) == 0.1
    assert clamp_deadline(1e9, 0.1, 1.0) == 0.1  # what grpc reports without a deadline
    assert clamp_deadline(5.0, 0.1, 1.0) == 1.0
    assert clamp_deadline(0.02, 0.1, 1.0) == 0.02


def test_budget_gives_the_remainder_minus_margin_and_fails_when_spent() -> None:
    now = [100.0]
    budget = Budget(0.050, clock=lambda: now[0])
    assert budget.for_call(cap_s=0.010, margin_s=0.002) == pytest.approx(0.010)
    now[0] += 0.045
    assert budget.for_call(cap_s=0.010, margin_s=0.002) == pytest.approx(0.003)
    now[0] += 0.004
    with pytest.raises(DeadlineExceeded):
        budget.for_call(margin_s=0.002)


async def test_server_has_health_reflection_and_maps_errors() -> None:
    server = await built_server(
        build_service,
        ExperimentSettings(port=0, experiments=PROJECT / "config" / "experiments.json"),
    )
    async with serving(server), channel_to(server) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        named = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="recmesh.experiment.v1.ExperimentService")
        )
        assert named.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
            assert "recmesh.experiment.v1.ExperimentService" in names
            break
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await experiment_pb2_grpc.ExperimentServiceStub(channel).Assign(
                experiment_pb2.AssignRequest(user_id=""), metadata=tenant_metadata("demo")
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-recmesh-field", "user_id") in tuple(error.value.trailing_metadata() or ())


async def test_failing_component_turns_health_not_serving() -> None:
    healthy = asyncio.Event()
    healthy.set()

    async def probe() -> None:
        if not healthy.is_set():
            raise ConnectionError("redis gone")

    server = await built_server(
        build_service,
        ExperimentSettings(port=0, experiments=PROJECT / "config" / "experiments.json"),
    )
    server.health._checks.append(HealthCheck("fake-redis", probe))
    async with serving(server), channel_to(server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        healthy.clear()
        await server.health.run_checks()
        reply = await stub.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "fake-redis" in server.health.failures


async def test_drain_reports_not_serving_and_lets_in_flight_calls_finish() -> None:
    server = await built_server(
        build_service,
        ExperimentSettings(
            port=0,
            experiments=PROJECT / "config" / "experiments.json",
            drain_delay_s=0.3,
            drain_grace_s=2.0,
        ),
    )
    await server.start()
    async with channel_to(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = experiment_pb2_grpc.ExperimentServiceStub(channel)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.1)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assigned = await stub.Assign(
            experiment_pb2.AssignRequest(user_id="u1"), metadata=tenant_metadata("demo")
        )
        assert assigned.assignments
        await stopping


async def test_a_server_is_not_serving_until_its_start_up_steps_finished() -> None:
    server = await built_server(
        build_service,
        ExperimentSettings(port=0, experiments=PROJECT / "config" / "experiments.json"),
    )
    release = asyncio.Event()
    checked = asyncio.Event()
    statuses: list[int] = []

    async def slow_startup() -> None:  # e.g. materialising features before serving
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        statuses.append(reply.status)
        checked.set()
        await release.wait()

    server.service.startups.append(slow_startup)
    starting = asyncio.create_task(server.start())
    await asyncio.wait_for(checked.wait(), 5)
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    release.set()
    await starting
    async with channel_to(server) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await server.stop(grace_s=0)


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_a_process_runs_on_the_event_loop_its_settings_name(kind: str) -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_loop(kind, main())
    assert seen == [kind]


def test_an_unknown_event_loop_is_a_config_error() -> None:
    async def main() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ConfigError, match="RECMESH_EVENT_LOOP"):
        run_loop("trio", main())


def test_what_start_up_left_is_frozen_out_of_full_collections() -> None:
    tables = [[n, str(n)] for n in range(50_000)]  # a start-up's long-lived objects
    try:
        asyncio.run(freeze_heap())
        assert gc.get_freeze_count() >= len(tables)  # a full collection skips them all
    finally:
        gc.unfreeze()
