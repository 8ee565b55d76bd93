"""Redis connections for services, and the health check that says Redis answers.

One URL says which server and in which mode (``REDIS_URL``):

* ``redis://host:port/0`` (``rediss://`` for TLS): one server, a :class:`redis.asyncio.Redis`.
* ``redis+cluster://host:port`` (``rediss+cluster://`` for TLS): a Redis or Valkey Cluster,
  a :class:`redis.asyncio.RedisCluster`. ``host:port`` is any node of it, from which the
  client learns the others (``CLUSTER SLOTS``); a cluster has database 0 only.

Every process and tool makes its clients here (:func:`client`, :func:`blocking_client`, or
the services' :func:`connect` and :func:`connect_blocking`), never with ``from_url``
itself, so one URL switches all of them. Code that holds a client types it as
:data:`AsyncRedis` or :data:`BlockingRedis`, which admit both kinds.

What a cluster asks of the code (``docs/operations.md``, "Running on a Valkey Cluster"):
every key of a tenant carries the tenant as a hash tag (``core.keys``), so a Lua script,
a transaction or a multi-key command over one tenant's keys stays in one slot; a command
over several tenants' keys (the projector's ``XREADGROUP`` over every tenant's log) is
split by slot with :func:`slot_groups`. ``MGET`` and ``MSET`` in a pipeline go through
:func:`queue_mget` and :func:`queue_mset`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from mesh.errors import ConfigError
from mesh.health import HealthCheck

SOCKET_TIMEOUT_S = 1.0
"""How long a command of a service's client may wait for its answer."""

CLUSTER_SCHEMES: dict[str, str] = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that name a cluster, and the plain scheme of each node's connections."""

AsyncRedis: TypeAlias = aioredis.Redis | aioredis.RedisCluster
"""An asyncio client of one server or of a cluster."""

BlockingRedis: TypeAlias = redis.Redis | redis.RedisCluster
"""A blocking client of one server or of a cluster."""


def cluster_url(url: str) -> str | None:
    """The plain ``redis://`` (or ``rediss://``) URL of a seed node when ``url`` names a
    cluster (``redis+cluster://``), else None.

    Raises:
        ConfigError: a cluster URL that names a database other than 0.
    """
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if plain is None:
        return None
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(f"a cluster has database 0 only, not {parts.path.strip('/')!r}: {url}")
    return urlunsplit((plain, parts.netloc, "", parts.query, parts.fragment))


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return cluster_url(url) is not None


def _required(url: str) -> str:
    if not url:
        raise ConfigError("REDIS_URL is not set; start the mesh with `make up` or set it")
    return url


def client(url: str, **options: Any) -> AsyncRedis:
    """An asyncio client for ``url``: a cluster client for a cluster URL, else a client of
    one server; ``options`` go to the client (``socket_timeout``, ``decode_responses``...).

    Raises:
        ConfigError: ``url`` is empty, or a cluster URL with a database other than 0.
    """
    seed = cluster_url(_required(url))
    if seed is not None:
        return aioredis.RedisCluster.from_url(seed, **options)
    return aioredis.Redis.from_url(url, **options)


def blocking_client(url: str, **options: Any) -> BlockingRedis:
    """A blocking client for ``url`` (see :func:`client`).

    Raises:
        ConfigError: ``url`` is empty, or a cluster URL with a database other than 0.
    """
    seed = cluster_url(_required(url))
    if seed is not None:
        return redis.RedisCluster.from_url(seed, **options)
    return redis.Redis.from_url(url, **options)


def connect(url: str) -> AsyncRedis:
    """A pooled asyncio client for ``url`` (hiredis parser when installed), one server's or
    a cluster's (at most 64 connections to each node).

    Raises:
        ConfigError: ``url`` is empty (the service was started without ``REDIS_URL``).
    """
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 1.0,
        "health_check_interval": 10,
        "max_connections": 64,
    }
    if not is_cluster(_required(url)):
        options["retry_on_timeout"] = False  # the cluster client takes no such option
    return client(url, **options)


def connect_blocking(url: str) -> BlockingRedis:
    """A blocking client for ``url`` for bulk work in a worker thread (hiredis packs its
    commands in C); a generous socket timeout, since one round trip carries 20k keys.

    Raises:
        ConfigError: ``url`` is empty.
    """
    return blocking_client(url, socket_timeout=30.0, socket_connect_timeout=1.0)


def slot_groups(client: AsyncRedis | BlockingRedis, names: Iterable[str]) -> list[list[str]]:
    """``names`` (keys) in groups that one command may name together: all of them for a
    client of one server; those of one hash slot for a cluster's (a command over keys of
    several slots fails there with ``CROSSSLOT``). Order is kept within and across groups
    (by first appearance)."""
    listed = list(names)
    if not isinstance(client, aioredis.RedisCluster | redis.RedisCluster):
        return [listed] if listed else []
    groups: dict[int, list[str]] = {}
    for name in listed:
        groups.setdefault(key_slot(name.encode()), []).append(name)
    return list(groups.values())


def queue_mget(pipe: Any, names: Sequence[str]) -> None:
    """Queue ``MGET names`` in ``pipe`` (one server's pipeline or a cluster's). redis-py
    refuses ``pipe.mget`` in a cluster's pipeline, even for keys of one slot; the plain
    command it accepts, and routes by the keys' slot. Its reply is the values, as
    ``mget``'s."""
    pipe.execute_command("MGET", *names)


def queue_mset(pipe: Any, mapping: Mapping[str, bytes | str]) -> None:
    """Queue ``MSET`` of ``mapping`` in ``pipe`` (see :func:`queue_mget`)."""
    pipe.execute_command("MSET", *(part for item in mapping.items() for part in item))


def redis_check(client: AsyncRedis) -> HealthCheck:
    """Healthy while ``client`` gets an answer to PING (a cluster's: from every node)."""

    async def probe() -> None:
        await client.ping()

    return HealthCheck("redis", probe)
