"""Helpers for tests that run real servers in-process (public, so no test mocks them).

In-process servers are plaintext unless a test asks for TLS (``built_server(...,
plaintext=False)``): every service of the in-process mesh shares one process, and mTLS and
the identity rule are tested with real certificates by ``tests/mesh/test_tls.py`` and by
the end-to-end tests, which run the processes as ``recmesh up`` does, TLS on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from mesh.client import open_channel
from mesh.context import TENANT_KEY
from mesh.server import MeshServer
from mesh.service import Service
from mesh.settings import ServerSettings

S = TypeVar("S", bound=ServerSettings)


@asynccontextmanager
async def serving(server: MeshServer) -> AsyncIterator[MeshServer]:
    """Start ``server`` (port 0 picks a free port), yield it, stop it without grace."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_s=0)


@asynccontextmanager
async def channel_to(server: MeshServer) -> AsyncIterator[grpc.aio.Channel]:
    """A mesh client channel to ``server``."""
    channel = open_channel(f"127.0.0.1:{server.port}")
    try:
        yield channel
    finally:
        await channel.close()


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that names ``tenant``."""
    return ((TENANT_KEY, tenant),)


class ManualClock:
    """A clock that moves only when a test moves it: pass it where code takes a ``clock``
    callable (breakers, caches, leases, budgets) and set ``now`` or call :meth:`advance`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def built_server(
    build: Callable[[S], Awaitable[Service]], settings: S, *, plaintext: bool = True
) -> MeshServer:
    """The server a service's process would run: its one builder, ``build(settings)``,
    wrapped in a :class:`~mesh.server.MeshServer` (not started; see :func:`serving`).

    With ``plaintext`` (the default) the settings' TLS is turned off, for the server and
    the channels its builder opens; otherwise ``settings.tls`` and ``tls_dir`` apply.
    """
    if plaintext:
        settings = dataclasses.replace(settings, tls=False)
    return MeshServer(settings, await build(settings))
