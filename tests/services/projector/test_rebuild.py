"""Replay: a rebuild into a fresh namespace (from the start, or from a snapshot plus the
tail) equals the live projections; retention trims only what a snapshot covers and the
group has acknowledged, and a rebuild after it still equals the live projections."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from core import keys
from core.replay import Projected
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from ops import cli
from services.projector import batch, rebuild
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections
from tests.services.projector.test_batch import CAP, event, projected_log

HALF_LIFE_S = 3600.0


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


def into(client: AsyncRedis, namespace: str) -> Projections:
    return Projections(client, CAP, HALF_LIFE_S, 600, namespace=namespace)


async def test_a_rebuild_into_a_fresh_namespace_equals_the_live_projections(
    client: AsyncRedis,
) -> None:
    name = await projected_log(client)
    live = await batch.read_projections(client, name)
    await client.rpush(keys.outcomes(name, "z", "r1"), "5")  # left over from an old rebuild
    done = await rebuild.rebuild(client, name, into(client, "r1"), HALF_LIFE_S)
    assert done.snapshot_position == "" and done.dead == 1
    rebuilt = await batch.read_projections(client, name, "r1")
    assert rebuilt.projected.outcomes == live.projected.outcomes != {}
    assert batch.compare(live, rebuilt, HALF_LIFE_S) == []
    # the live keys were not touched, and the namespace goes away whole
    assert await batch.read_projections(client, name) == live
    assert await rebuild.drop_namespace(client, name, "r1") > 0
    assert await batch.read_projections(client, name, "r1") == batch.Live(Projected())


async def test_a_changed_live_projection_makes_the_rebuild_differ(client: AsyncRedis) -> None:
    name = await projected_log(client)
    await rebuild.rebuild(client, name, into(client, "r2"), HALF_LIFE_S)
    await client.zadd(keys.trending(name), {"1": 1e9})
    found = batch.compare(
        await batch.read_projections(client, name),
        await batch.read_projections(client, name, "r2"),
        HALF_LIFE_S,
    )
    assert [line.split(":")[0] for line in found] == ["trending score of item 1"]


async def tail_projected(client: AsyncRedis, name: str, reader_events: int, tag: str) -> None:
    """Append ``reader_events`` clicks (ids unique by ``tag``: the log's append would
    refuse a repeated id) and let the projector read the whole log."""
    reader = StreamProjector(client, into(client, ""), [name], group="projector", consumer="test")
    for n in range(reader_events):
        await client.xadd(
            keys.events(name),
            {"e": event(f"{tag}{n}", "click", "a", 2, int(time.time() * 1000)).SerializeToString()},
        )
    while await reader.read_once():
        pass


async def test_trimming_keeps_what_the_snapshot_does_not_cover_and_a_rebuild_still_agrees(
    client: AsyncRedis,
) -> None:
    name = await projected_log(client)
    await tail_projected(client, name, 2, "first")  # the projector read everything
    unread = await client.xadd(
        keys.events(name),
        {"e": event("late", "click", "b", 1, int(time.time() * 1000)).SerializeToString()},
    )
    length = await client.xlen(keys.events(name))
    cut = await rebuild.trim(
        client, name, int(time.time() * 1000) + 60_000, "projector", HALF_LIFE_S, CAP
    )
    # everything up to the last entry the group read is trimmed; the unread one stays
    assert cut.removed == length - 1
    remaining = cast(list[tuple[bytes, object]], await client.xrange(keys.events(name)))
    assert [position for position, _ in remaining] == [unread]
    snapshot = await batch.load_snapshot(client, name)
    assert snapshot is not None and snapshot.position == cut.position
    await tail_projected(client, name, 1, "then")  # the projector reads the rest
    assert await batch.verify(client, [name], HALF_LIFE_S, CAP) == {name: []}
    await rebuild.rebuild(client, name, into(client, "r3"), HALF_LIFE_S)
    assert (
        batch.compare(
            await batch.read_projections(client, name),
            await batch.read_projections(client, name, "r3"),
            HALF_LIFE_S,
        )
        == []
    )
    with pytest.raises(ValueError, match="trimmed"):
        await rebuild.rebuild(client, name, into(client, "r4"), HALF_LIFE_S, from_snapshot=False)


async def test_nothing_is_trimmed_before_the_group_reads_it(client: AsyncRedis) -> None:
    name = "tr" + str(time.time_ns())
    await client.xadd(keys.events(name), {"e": event("x", "click", "a", 1, 1).SerializeToString()})
    future = int(time.time() * 1000) + 60_000
    assert await rebuild.trim(client, name, future, "projector", HALF_LIFE_S, CAP) == (
        rebuild.Trimmed("", 0)
    )  # no group yet
    reader = StreamProjector(client, into(client, ""), [name], group="projector", consumer="c1")
    await reader.prepare()
    assert (await rebuild.trim(client, name, future, "projector", HALF_LIFE_S, CAP)).removed == 0
    await client.xreadgroup("projector", "c1", {keys.events(name): ">"})  # read, not acked
    assert (await rebuild.trim(client, name, future, "projector", HALF_LIFE_S, CAP)).removed == 0
    assert await client.xlen(keys.events(name)) == 1


async def test_the_rebuild_command_verifies_and_exits_non_zero_on_a_difference(
    client: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = await projected_log(client)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RECMESH_FEATURE_HISTORY_CAP", str(CAP))
    argv = ["projections", "rebuild", "--tenant", name, "--verify"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    await client.hset(keys.item_counters(name, 2), items=["impression", "3", "impression_at", "1"])
    assert await asyncio.to_thread(cli.main, argv) == 1
    # the namespaces were dropped after each run
    assert not [k async for k in client.scan_iter(match=f"{keys.tenant_prefix(name)}ns:*")]


async def test_retention_trims_each_tenant_once_per_round_among_replicas(
    client: AsyncRedis,
) -> None:
    name = await projected_log(client)
    await tail_projected(client, name, 1, "r")
    length = await client.xlen(keys.events(name))
    replicas = [
        rebuild.Retention(
            client,
            {name: 1e-9},  # everything appended so far is older than that
            group="projector",
            half_life_s=HALF_LIFE_S,
            history_cap=CAP,
            every_s=60.0,
        )
        for _ in range(2)
    ]
    first, second = [await replica.once() for replica in replicas]
    assert first[name].removed == length  # the whole log, read and acknowledged
    assert second == {}  # the other replica found the tenant's lock held
    assert await client.xlen(keys.events(name)) == 0
    assert await batch.verify(client, [name], HALF_LIFE_S, CAP) == {name: []}


async def test_the_trim_command_uses_the_tenants_retention(
    client: AsyncRedis, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = await projected_log(client)
    await tail_projected(client, name, 1, "c")
    tenants = tmp_path / "tenants.json"
    spec = {"rate": 10, "burst": 20}
    tenants.write_text(
        json.dumps(
            {
                "tenants": {
                    name: {**spec, "api_key_sha256": "a" * 64, "retention_days": 1},
                    "keep": {**spec, "api_key_sha256": "b" * 64},
                }
            }
        )
    )
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RECMESH_TENANTS", str(tenants))
    monkeypatch.setenv("RECMESH_FEATURE_HISTORY_CAP", str(CAP))
    length = await client.xlen(keys.events(name))
    # one day of retention: nothing of this log is old enough
    assert await asyncio.to_thread(cli.main, ["events", "trim", "--tenant", name]) == 0
    assert await client.xlen(keys.events(name)) == length
    argv = ["events", "trim", "--tenant", name, "--keep-days", "0.0000001"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert await client.xlen(keys.events(name)) == 0
