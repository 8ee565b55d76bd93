"""Drain hooks: when ``MeshServer.stop`` runs them, relative to health, delay and clean-ups."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.testing import built_server, channel_to
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

PROJECT = Path(__file__).resolve().parents[2]


async def test_drain_hooks_run_once_not_serving_before_the_delay_then_cleanups_run() -> None:
    delay_s = 0.3
    server = await built_server(
        build_service,
        ExperimentSettings(
            port=0,
            experiments=PROJECT / "config" / "experiments.json",
            drain_delay_s=delay_s,
            drain_grace_s=1.0,
        ),
    )
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, float]] = []
    await server.start()
    async with channel_to(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def first_hook() -> None:
            # The port still serves while the hooks run, and already says NOT_SERVING.
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            seen.append((f"drain {status}", loop.time()))

        async def second_hook() -> None:
            seen.append(("drain", loop.time()))

        async def cleanup() -> None:
            seen.append(("cleanup", loop.time()))

        server.service.drains.extend([first_hook, second_hook])
        server.service.cleanups.append(cleanup)
        await server.stop()

    assert [step for step, _ in seen] == ["drain NOT_SERVING", "drain", "cleanup"]
    # The drain delay lies between the hooks and the clean-ups (a lower bound: a loaded
    # host only widens it). Timer handles may fire up to the clock resolution early.
    assert seen[2][1] - seen[1][1] >= delay_s - 0.01
