"""Process entry point shared by every service: settings, logging, telemetry, serve until
signalled."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from mesh.errors import ConfigError
from mesh.http import metrics_listener
from mesh.logging import configure_logging
from mesh.server import MeshServer
from mesh.service import Service
from mesh.settings import ServerSettings, load
from mesh.telemetry import setup_tracing

S = TypeVar("S", bound=ServerSettings)


def run_service(build: Callable[[S], Awaitable[Service]], settings_cls: type[S]) -> None:
    """Load ``settings_cls`` from the environment, set up tracing (``OTEL_*``) and the
    ``/metrics`` endpoint, build the service with its one builder, start it, freeze what
    start-up left on the heap (:func:`freeze_heap`), serve it until SIGTERM; flush spans at
    exit."""
    settings = load(settings_cls)
    configure_logging(settings.service_name, settings.log_level)
    telemetry = setup_tracing(settings.service_name)

    async def main() -> None:
        service = await build(settings)
        if settings.metrics_port >= 0:
            metrics = metrics_listener(settings.host, settings.metrics_port)
            service.startups.insert(0, metrics.start)
            service.cleanups.append(metrics.stop)
        service.startups.append(freeze_heap)
        await MeshServer(settings, service).serve_until_signalled()

    try:
        run_loop(settings.event_loop, main())
    finally:
        telemetry.shutdown()


async def freeze_heap() -> None:
    """Collect start-up's garbage, then move every object still alive (models, indexes,
    catalogs, modules) into the collector's permanent generation (:func:`gc.freeze`).

    A full collection walks every tracked object: with a retrieval set's 1M-item tables
    that is about 12 ms during which the process's event loop answers nothing, and it
    comes back whenever enough objects have survived younger collections. Frozen objects
    are never walked again; they are still freed as usual when their last reference goes
    (an artifact set swapped out), only a reference cycle among them is never collected.
    Objects created later (a swapped-in set) are collected as before.
    """
    gc.collect()
    gc.freeze()


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
