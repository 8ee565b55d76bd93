"""Process entry point shared by every service: settings, logging, serve until signalled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mesh.logging import configure_logging
from mesh.server import MeshServer
from mesh.settings import ServerSettings, load

S = TypeVar("S", bound=ServerSettings)


def run_service(build: Callable[[S], Awaitable[MeshServer]], settings_cls: type[S]) -> None:
    """Load ``settings_cls`` from the environment, build the server and serve until SIGTERM."""
    settings = load(settings_cls)
    configure_logging(settings.service_name, settings.log_level)

    async def main() -> None:
        server = await build(settings)
        await server.serve_until_signalled()

    asyncio.run(main())
