"""The Redis URL decides the client's mode: one server, or a cluster (``redis+cluster://``)."""

from __future__ import annotations

import itertools

import pytest
import redis.asyncio as aioredis

from core import keys
from mesh import redis as mesh_redis
from mesh.errors import ConfigError
from ops.redis_server import CLUSTER_SLOTS, slot_ranges


def test_a_cluster_url_names_a_seed_node_of_database_0() -> None:
    assert mesh_redis.cluster_url("redis+cluster://10.0.0.1:7000") == "redis://10.0.0.1:7000"
    assert mesh_redis.cluster_url("redis+cluster://h:7000/0") == "redis://h:7000"
    assert mesh_redis.cluster_url("rediss+cluster://u:p@h:7000?ssl_cert_reqs=none") == (
        "rediss://u:p@h:7000?ssl_cert_reqs=none"
    )
    assert mesh_redis.cluster_url("redis://h:6379/0") is None
    assert not mesh_redis.is_cluster("redis://h:6379/0")
    with pytest.raises(ConfigError, match="database 0 only"):
        mesh_redis.cluster_url("redis+cluster://h:7000/3")


async def test_the_url_picks_the_client() -> None:
    single = mesh_redis.connect("redis://127.0.0.1:1/0")
    cluster = mesh_redis.connect("redis+cluster://127.0.0.1:1")  # connects on first use
    try:
        assert type(single) is aioredis.Redis
        assert isinstance(cluster, aioredis.RedisCluster)
    finally:
        await single.aclose()
        await cluster.aclose()
    with pytest.raises(ConfigError, match="REDIS_URL"):
        mesh_redis.connect("")


async def test_keys_are_grouped_by_slot_only_for_a_cluster() -> None:
    streams = [keys.events(t) for t in ("demo", "acme", "demo")]
    single = mesh_redis.connect("redis://127.0.0.1:1/0")
    cluster = mesh_redis.connect("redis+cluster://127.0.0.1:1")
    try:
        assert mesh_redis.slot_groups(single, streams) == [streams]
        assert mesh_redis.slot_groups(cluster, streams) == [
            [keys.events("demo"), keys.events("demo")],
            [keys.events("acme")],
        ]
        assert mesh_redis.slot_groups(cluster, []) == []
    finally:
        await single.aclose()
        await cluster.aclose()


def test_three_masters_share_the_slots_as_valkey_cli_splits_them() -> None:
    assert slot_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]
    for masters in (1, 2, 5):
        ranges = slot_ranges(masters)
        assert ranges[0][0] == 0 and ranges[-1][1] == CLUSTER_SLOTS - 1
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))
