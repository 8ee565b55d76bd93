"""Process entry point shared by every service: settings, logging, telemetry, serve until
signalled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from mesh.errors import ConfigError
from mesh.logging import configure_logging
from mesh.server import MeshServer
from mesh.settings import ServerSettings, load
from mesh.telemetry import MetricsEndpoint, metrics_port, setup_tracing

S = TypeVar("S", bound=ServerSettings)


def run_service(build: Callable[[S], Awaitable[MeshServer]], settings_cls: type[S]) -> None:
    """Load ``settings_cls`` from the environment, set up tracing (``OTEL_*``) and the
    ``/metrics`` endpoint, build the server and serve until SIGTERM; flush spans at exit."""
    settings = load(settings_cls)
    configure_logging(settings.service_name, settings.log_level)
    telemetry = setup_tracing(settings.service_name)
    port = metrics_port(settings.service_name)

    async def main() -> None:
        server = await build(settings)
        if port is not None:
            metrics = MetricsEndpoint(settings.host, port)
            server.startups.insert(0, metrics.start)
            server.cleanups.append(metrics.stop)
        await server.serve_until_signalled()

    try:
        run_loop(settings.event_loop, main())
    finally:
        telemetry.shutdown()


def run_loop(kind: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to completion on a new event loop of ``kind`` (``uvloop`` or ``asyncio``).

    Raises:
        ConfigError: ``kind`` is neither.
    """
    if kind == "uvloop":
        uvloop.run(main)
    elif kind == "asyncio":
        asyncio.run(main)
    else:
        main.close()
        raise ConfigError(f"RECMESH_EVENT_LOOP must be uvloop or asyncio, not {kind!r}")
