"""The projector against a real Valkey: idempotent projections, order-free decay, claims of
a crashed consumer's entries, dead letters, lag."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import cast

import pytest
from recmesh.events.v1 import events_pb2

from core import keys
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from services.projector.consumer import Lag, StreamProjector
from services.projector.projections import Projections

HOUR_MS = 3_600_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


def projections(client: AsyncRedis) -> Projections:
    return Projections(client, history_cap=3, half_life_s=3600.0, applied_ttl_s=600)


def tenant() -> str:
    return "pj" + uuid.uuid4().hex[:8]


def event(kind: str, item: int, ts_ms: int, user: str = "u1", **fields: object) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=uuid.uuid4().hex,
        type=kind,
        user_id=user,
        item_id=item,
        ts_ms=ts_ms,
        **fields,  # type: ignore[arg-type]
    )


async def history(client: AsyncRedis, name: str, user: str = "u1") -> list[int]:
    return [int(i) for i in await client.lrange(keys.outcomes(name, user), 0, -1)]


async def test_applying_an_event_twice_changes_nothing(client: AsyncRedis) -> None:
    name, now = tenant(), int(time.time() * 1000)
    batch = [event("impression", 7, now), event("click", 7, now + 1), event("dismiss", 7, now)]
    view = projections(client)
    assert (await view.apply(name, batch)).applied == 3
    assert (await view.apply(name, batch)).applied == 0  # a redelivery
    assert await history(client, name) == [7]
    counters = await view.item_counters(name, 7)
    assert (counters["impression"], counters["click"]) == (1.0, 1.0)
    assert "conversion" not in counters


async def test_recent_outcomes_keep_the_newest_clicks_and_conversions(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    outcomes = [event("click", item, now + item) for item in (1, 2, 3)]
    await projections(client).apply(
        name, [*outcomes, event("impression", 9, now), event("conversion", 4, now + 4)]
    )
    assert await history(client, name) == [2, 3, 4]  # capped at 3, newest last


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
async def test_decayed_counts_do_not_depend_on_the_order_events_arrive_in(
    client: AsyncRedis, order: tuple[int, ...]
) -> None:
    name, start = tenant(), 1_700_000_000_000
    shown = [event("impression", 5, start + k * HOUR_MS) for k in range(3)]
    await projections(client).apply(name, [shown[k] for k in order])
    counters = await projections(client).item_counters(name, 5)
    # As of the last impression, one half-life apart: 1 + 1/2 + 1/4.
    assert counters["impression"] == pytest.approx(1.75, rel=1e-12)
    assert counters["impression_at"] == start + 2 * HOUR_MS


def projector(
    client: AsyncRedis,
    names: list[str],
    claim_idle_s: float = 30.0,
    clock: Callable[[], float] = time.time,
    **options: float,
) -> StreamProjector:
    return StreamProjector(
        client,
        projections(client),
        names,
        group="projector",
        consumer="test",
        claim_idle_s=claim_idle_s,
        clock=clock,
        **options,  # type: ignore[arg-type]
    )


async def append(client: AsyncRedis, name: str, *events: events_pb2.Event) -> list[str]:
    positions = [await client.xadd(keys.events(name), {"e": e.SerializeToString()}) for e in events]
    return [cast(bytes, position).decode() for position in positions]


async def pending(client: AsyncRedis, name: str) -> int:
    summary = await client.xpending(keys.events(name), "projector")
    return int(summary["pending"])


async def test_new_entries_are_applied_acknowledged_and_the_lag_drains(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name])
    await reader.prepare()
    await append(client, name, event("click", 11, now), event("click", 12, now))
    lag = await reader.lag(name)
    assert lag.events == 2 and lag.seconds >= 0.0
    assert await reader.read_once() == 2
    assert await history(client, name) == [11, 12]
    assert await pending(client, name) == 0
    assert (await reader.lag(name)).events == 0


async def test_a_crashed_consumers_entries_are_claimed_and_applied_once(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name], claim_idle_s=0.05)
    await reader.prepare()
    await append(client, name, event("click", 21, now))
    # Another replica read the entry and died before acknowledging it.
    await client.xreadgroup("projector", "crashed", {keys.events(name): ">"}, count=10)
    assert await pending(client, name) == 1
    await asyncio.sleep(0.1)
    assert await reader.claim_once() == 1
    assert await pending(client, name) == 0
    assert await history(client, name) == [21]
    assert await reader.claim_once() == 0  # nothing left to claim


async def test_a_poison_entry_goes_to_the_dead_letters_and_the_stream_flows_on(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name])
    await reader.prepare()
    await client.xadd(keys.events(name), {"e": b"\xff\xfe not a protobuf"})
    bad_item = event("click", 31, now)
    bad_item.item_id = -1
    await append(client, name, bad_item, event("click", 32, now))
    assert await reader.read_once() == 3
    assert await history(client, name) == [32]
    assert await pending(client, name) == 0
    dead = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.dead_letters(name))
    )
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert len(reasons) == 2
    assert reasons[0].startswith("not an Event")
    assert reasons[1].startswith("events[0].item_id")


async def test_an_event_the_script_fails_on_is_retried_then_dead_lettered_alone(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name], claim_idle_s=0.01, max_deliveries=3)
    await reader.prepare()
    await client.set(keys.outcomes(name, "broken"), "a string, not a list")  # WRONGTYPE
    await append(
        client,
        name,
        event("click", 41, now),
        event("click", 42, now, user="broken"),
        event("click", 43, now),
    )
    assert await reader.read_once() == 3
    assert await history(client, name) == [41, 43]  # the batch went on without it
    assert await pending(client, name) == 1
    for _ in range(3):  # delivered once by the read, then claimed until the cap
        await asyncio.sleep(0.02)
        await reader.claim_once()
    assert await pending(client, name) == 0
    dead = cast(
        list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(keys.dead_letters(name))
    )
    assert [fields[b"reason"] for _, fields in dead] == [b"not applied after 3 deliveries"]
    assert events_pb2.Event.FromString(dead[0][1][b"e"]).user_id == "broken"


async def test_gone_replicas_are_deleted_from_the_group_once_they_hold_nothing(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name], claim_idle_s=0.01, consumer_idle_s=0.01)
    await reader.prepare()
    await append(client, name, event("click", 51, now))
    await client.xreadgroup("projector", "gone-1", {keys.events(name): ">"}, count=10)
    await asyncio.sleep(0.03)
    await reader.claim_once()  # takes gone-1's entry; gone-1 still held it at the check
    await asyncio.sleep(0.03)
    await reader.claim_once()
    consumers = await client.xinfo_consumers(keys.events(name), "projector")
    assert [c["name"] for c in consumers] == [b"test"]
    assert await history(client, name) == [51]


async def test_each_tenant_is_projected_into_its_own_keys(client: AsyncRedis) -> None:
    first, second, now = tenant(), tenant(), int(time.time() * 1000)
    reader = projector(client, [first, second])
    await reader.prepare()
    await append(client, first, event("click", 41, now))
    await append(client, second, event("click", 42, now))
    handled = 0
    for _ in range(5):
        handled += await reader.read_once()
        if handled == 2:
            break
    assert (await history(client, first), await history(client, second)) == ([41], [42])
    assert await projections(client).item_counters(second, 41) == {}


async def test_the_lag_counts_unread_entries_and_the_age_of_the_oldest(
    client: AsyncRedis,
) -> None:
    name = tenant()
    now = [time.time()]
    reader = projector(client, [name], clock=lambda: now[0])
    await reader.prepare()
    first, _ = await append(client, name, *(event("click", 61, 1) for _ in range(2)))
    appended_s = int(first.split("-")[0]) / 1000
    now[0] = appended_s + 3.0
    lag = await reader.lag(name)
    assert lag.events == 2
    assert lag.seconds == pytest.approx(3.0, abs=0.01)
    await reader.read_once()
    assert await reader.lag(name) == Lag(0, 0.0)


async def test_an_event_dated_in_the_future_counts_at_its_append_time(
    client: AsyncRedis,
) -> None:
    name = tenant()
    reader = projector(client, [name])
    await reader.prepare()
    ahead = int(time.time() * 1000) + 12 * HOUR_MS  # a client clock 12 h fast
    (position,) = await append(client, name, event("impression", 71, ahead))
    await reader.read_once()
    counters = await projections(client).item_counters(name, 71)
    assert counters["impression_at"] == int(position.split("-")[0])


async def test_a_log_lost_with_its_group_is_projected_again_from_the_start(
    client: AsyncRedis,
) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name])
    await reader.prepare()
    await client.delete(keys.events(name))  # Redis restarted without its data
    assert await reader.read_once() == 0  # NOGROUP: the group is created again
    await append(client, name, event("click", 81, now))
    assert await reader.read_once() == 1
    assert await history(client, name) == [81]


async def test_the_projector_is_progressing_only_while_its_reads_succeed(
    client: AsyncRedis,
) -> None:
    name = tenant()
    reader = projector(client, [name])
    assert not reader.progressing(within_s=5.0)  # not started
    await reader.start()
    try:
        for _ in range(50):
            if reader.progressing(within_s=5.0):
                break
            await asyncio.sleep(0.02)
        assert reader.progressing(within_s=5.0)
    finally:
        await reader.stop()
    assert not reader.progressing(within_s=5.0)


async def test_a_restarted_replica_applies_what_it_had_read_before_anything_new(
    client: AsyncRedis,
) -> None:
    """Killed between reading and acknowledging, then restarted under its stable name: the
    entries it held come first, so the user's outcomes stay in log order."""
    name, now = tenant(), int(time.time() * 1000)
    first = projector(client, [name])
    await first.prepare()
    await append(client, name, event("click", 61, now))
    await client.xreadgroup("projector", "test", {keys.events(name): ">"}, count=10)  # dies
    await append(client, name, event("click", 62, now + 1))
    again = projector(client, [name])  # the same consumer name, a new process
    assert await again.read_once() == 1  # its own pending entry
    assert await history(client, name) == [61]
    assert await again.read_once() == 1  # none left of its own: then the new entry
    assert await history(client, name) == [61, 62]
    assert await pending(client, name) == 0


async def test_a_partial_round_lingers_so_the_next_gathers_more(client: AsyncRedis) -> None:
    name, now = tenant(), int(time.time() * 1000)
    reader = projector(client, [name], batch=3, linger_ms=1000)
    await reader.prepare()
    loop = asyncio.get_running_loop()
    await append(client, name, event("click", 1, now))
    started = loop.time()
    assert await reader.read_once() == 1  # own backlog (none), then one new entry: a partial round
    assert loop.time() - started >= 1.0
    await append(client, name, *(event("click", item, now) for item in (2, 3, 4)))
    started = loop.time()
    assert await reader.read_once() == 3  # a full batch: no wait, more may be waiting
    assert loop.time() - started < 1.0
    assert await history(client, name) == [2, 3, 4]
