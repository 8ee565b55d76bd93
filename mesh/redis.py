"""Redis connections for services, and the health check that says Redis answers."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from mesh.errors import ConfigError
from mesh.health import HealthCheck

SOCKET_TIMEOUT_S = 1.0
"""How long a command of a service's client may wait for its answer."""


def connect(url: str) -> aioredis.Redis:
    """A pooled asyncio client for ``url`` (hiredis parser when installed).

    Raises:
        ConfigError: ``url`` is empty (the service was started without ``REDIS_URL``).
    """
    if not url:
        raise ConfigError("REDIS_URL is not set; start the mesh with `make up` or set it")
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=1.0,
        health_check_interval=10,
        retry_on_timeout=False,
        max_connections=64,
    )


def connect_blocking(url: str) -> redis.Redis:
    """A blocking client for ``url`` for bulk work in a worker thread (hiredis packs its
    commands in C); a generous socket timeout, since one round trip carries 20k keys.

    Raises:
        ConfigError: ``url`` is empty.
    """
    if not url:
        raise ConfigError("REDIS_URL is not set; start the mesh with `make up` or set it")
    return redis.Redis.from_url(url, socket_timeout=30.0, socket_connect_timeout=1.0)


def redis_check(client: aioredis.Redis) -> HealthCheck:
    """Healthy while ``client`` gets an answer to PING."""

    async def probe() -> None:
        await client.ping()

    return HealthCheck("redis", probe)
