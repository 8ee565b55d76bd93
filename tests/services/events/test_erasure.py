"""Erasing a user (``EraseUser``) against a real Valkey, a real events service and the
real projector: nothing of the user is left in the tenant's keys or streams, other users
are untouched, the counters of the items the user's events touched equal a recompute from
the remaining log (also while the projector lags or runs), a rebuild brings nothing back,
and every erasure is audited without the raw user id."""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core import keys
from core.logread import read_log
from core.replay import decayed
from core.validation import MAX_USER_ID_BYTES
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from services.events.server import build_service as build_events
from services.events.settings import EventsSettings
from services.projector import batch, rebuild
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections

HALF_LIFE_S = 3600.0
CAP = 50
MINUTE_MS = 60_000
CATEGORIES = {1: 4, 2: 7, 3: 7, 4: 9, 5: 4}

Entry = tuple[bytes, dict[bytes, bytes]]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncRedis]:
    connection = mesh_redis.client(redis_url)
    yield connection
    await connection.aclose()


@pytest.fixture(scope="module")
async def events(redis_url: str) -> AsyncIterator[events_pb2_grpc.EventServiceAsyncStub]:
    settings = EventsSettings(port=0, redis_url=redis_url, half_life_s=HALF_LIFE_S)
    server = await built_server(build_events, settings)
    async with serving(server), channel_to(server) as channel:
        yield events_pb2_grpc.EventServiceStub(channel)


def projector(client: AsyncRedis, tenant: str, **options: Any) -> StreamProjector:
    return StreamProjector(
        client,
        Projections(client, history_cap=CAP, half_life_s=HALF_LIFE_S, applied_ttl_s=600),
        [tenant],
        group="projector",
        consumer="test",
        block_ms=10,
        **options,
    )


def event(kind: str, user: str, item: int, ts_ms: int, request_id: str = "") -> events_pb2.Event:
    return events_pb2.Event(
        event_id=uuid.uuid4().hex,
        type=kind,
        user_id=user,
        item_id=item,
        ts_ms=ts_ms,
        request_id=request_id,
    )


async def append(
    stub: events_pb2_grpc.EventServiceAsyncStub, tenant: str, *batch_: events_pb2.Event
) -> None:
    reply = await stub.Append(
        events_pb2.AppendRequest(events=list(batch_)), metadata=tenant_metadata(tenant)
    )
    assert reply.appended == len(batch_)


async def erase(
    stub: events_pb2_grpc.EventServiceAsyncStub, tenant: str, user: str, by: str = "test-operator"
) -> events_pb2.EraseUserResponse:
    return await stub.EraseUser(
        events_pb2.EraseUserRequest(user_id=user, requested_by=by),
        metadata=tenant_metadata(tenant),
    )


async def drain(reader: StreamProjector) -> None:
    while await reader.read_once():
        pass


async def dump(client: AsyncRedis, tenant: str) -> dict[str, bytes]:
    """Every key of ``tenant`` with its whole content as bytes (a snapshot's state
    decompressed), so a test can look for a user id anywhere."""
    found: dict[str, bytes] = {}
    async for raw in client.scan_iter(match=f"{keys.tenant_prefix(tenant)}*", count=1000):
        name = cast(bytes, raw).decode()
        kind = cast(bytes, await client.type(name)).decode()
        content: Any
        if kind == "string":
            content = await client.get(name)
        elif kind == "list":
            content = await client.lrange(name, 0, -1)
        elif kind == "hash":
            content = await client.hgetall(name)
            if name == keys.snapshot(tenant):
                content[b"state"] = zlib.decompress(content[b"state"])
        elif kind == "zset":
            content = await client.zrange(name, 0, -1, withscores=True)
        elif kind == "set":
            content = sorted(await client.smembers(name))
        elif kind == "stream":
            content = await client.xrange(name)
        else:
            raise AssertionError(f"unexpected key type {kind} of {name}")
        found[name] = repr(content).encode()
    return found


async def user_keys(client: AsyncRedis, tenant: str, user: str) -> dict[str, bytes]:
    """The user's own projection and feature keys, with their content."""
    names = [
        keys.outcomes(tenant, user),
        keys.category_shares(tenant, user),
        keys.user_row(tenant, user),
        keys.history(tenant, user),
    ]
    every = await dump(client, tenant)
    return {name: every[name] for name in names if name in every}


def assert_counters_equal_a_recompute(
    live: batch.Live, recomputed: batch.Live, items: set[int]
) -> None:
    """The live counters of ``items`` hold the same decayed counts as ``recomputed`` at any
    time from now on (a snapshot counter keeps its time when an event is taken out of it,
    so the times may differ where the values, decayed to one time, do not)."""
    now = int(time.time() * 1000)
    tau = HALF_LIFE_S * 1000 / math.log(2)
    for item in items:
        mine = live.projected.counters.get(item, {})
        theirs = recomputed.projected.counters.get(item, {})
        assert mine.keys() == theirs.keys(), item
        for kind, (value, at) in mine.items():
            want = decayed(*theirs[kind], now, tau)
            assert decayed(value, at, now, tau) == pytest.approx(want, rel=1e-9), (item, kind)
        assert (item in live.trending) == (item in recomputed.trending), item


async def test_an_erased_user_leaves_nothing_and_the_counters_equal_a_recompute(
    client: AsyncRedis, events: events_pb2_grpc.EventServiceAsyncStub
) -> None:
    tenant = "er" + uuid.uuid4().hex[:8]
    victim, bob, carol = "alice-" + uuid.uuid4().hex, "bob", "carol"
    reader = projector(client, tenant)
    await reader.prepare()
    for item, category in CATEGORIES.items():
        await client.set(keys.item_row(tenant, item), struct.pack("<fi", 0.5, category))
    for user in (victim, bob):
        await client.set(keys.user_row(tenant, user), struct.pack("<ff", 0.1, 0.2))
        await client.rpush(keys.history(tenant, user), 7, 8)
    t0 = int(time.time() * 1000) - 60 * MINUTE_MS
    request = "req-" + uuid.uuid4().hex
    await append(
        events,
        tenant,
        event("impression", bob, 1, t0),
        event("impression", victim, 1, t0 + MINUTE_MS, request),  # the latest impression of 1
        event("click", victim, 1, t0 + 2 * MINUTE_MS, request),
        event("impression", victim, 4, t0 + 2 * MINUTE_MS, request),
        event("click", victim, 4, t0 + 3 * MINUTE_MS, request),  # 4's only click
        event("conversion", victim, 2, t0 + 4 * MINUTE_MS),  # 2's only conversion
        event("click", bob, 1, t0 + 5 * MINUTE_MS),
        event("click", bob, 2, t0 + 5 * MINUTE_MS),
        event("impression", bob, 5, t0 + 6 * MINUTE_MS),
        event("click", carol, 3, t0 + 6 * MINUTE_MS),
    )
    # Two entries the projector dead-letters: an invalid event of the victim, and bytes
    # that are no event at all (which cannot name anyone and stay).
    bogus = event("bogus", victim, 3, t0 + 7 * MINUTE_MS)
    await client.xadd(keys.events(tenant), {"e": bogus.SerializeToString()})
    await client.xadd(keys.events(tenant), {"e": b"\xff\xfe not an event"})
    await drain(reader)
    # A snapshot over the whole log so far, the log left untrimmed: the erasure must edit
    # both (retention stores one only where it trims; this is the general case).
    taken = await batch.recompute(client, tenant, HALF_LIFE_S, CAP)
    assert await batch.store_snapshot(client, tenant, taken, None, trimmed_to="")
    assert victim in taken.outcomes and victim in taken.shares
    await append(
        events,
        tenant,
        event("click", victim, 3, t0 + 8 * MINUTE_MS),
        event("impression", victim, 2, t0 + 9 * MINUTE_MS),
        event("click", bob, 1, t0 + 10 * MINUTE_MS),
        event("impression", bob, 4, t0 + 10 * MINUTE_MS),
    )
    await drain(reader)
    old = Projections(client, CAP, HALF_LIFE_S, 600, namespace="before-erasure")
    await rebuild.rebuild(client, tenant, old, HALF_LIFE_S)
    assert await client.exists(keys.outcomes(tenant, victim, "before-erasure"))
    assert await batch.verify(client, [tenant], HALF_LIFE_S, CAP) == {tenant: []}
    bob_before = await user_keys(client, tenant, bob)
    carol_before = await user_keys(client, tenant, carol)
    others_before = [
        (p, e) for p, e in await read_log(client, tenant) if e is None or e.user_id != victim
    ]

    erased = await erase(events, tenant, victim)

    digest = "sha256:" + hashlib.sha256(victim.encode()).hexdigest()
    assert erased.subject == digest
    # the victim's 7 events appended, and the invalid one; its dead letter; outcomes and
    # shares, live and in the rebuild namespace; both parts of the snapshot; row, history;
    # items 1, 2, 3 and 4.
    assert (
        erased.events,
        erased.dead_letters,
        erased.projections,
        erased.snapshot_entries,
        erased.feature_keys,
        erased.items_recomputed,
    ) == (8, 1, 4, 2, 2, 4)
    # Nothing of the victim anywhere in the tenant's keys and streams.
    everything = await dump(client, tenant)
    assert all(victim not in name for name in everything)
    assert [name for name, content in everything.items() if victim.encode() in content] == []
    assert not await client.exists(keys.request_events(tenant, request))
    # Everyone else is untouched: their events, projections and features.
    assert await read_log(client, tenant) == others_before
    assert await user_keys(client, tenant, bob) == bob_before
    assert await user_keys(client, tenant, carol) == carol_before
    dead = cast(list[Entry], await client.xrange(keys.dead_letters(tenant)))
    assert [fields[b"e"] for _, fields in dead] == [b"\xff\xfe not an event"]
    # The projections equal a recompute from the snapshot and the remaining log, and the
    # touched counters equal a recompute of the remaining log from its start.
    assert await batch.verify(client, [tenant], HALF_LIFE_S, CAP) == {tenant: []}
    live = await batch.read_projections(client, tenant)
    from_start = batch.expected(
        await batch.recompute(client, tenant, HALF_LIFE_S, CAP), HALF_LIFE_S
    )
    assert_counters_equal_a_recompute(live, from_start, {1, 2, 3, 4, 5})
    assert 4 not in live.trending and live.projected.counters[4].keys() == {"impression"}
    assert "conversion" not in live.projected.counters[2]
    # A rebuild brings nothing back.
    again = Projections(client, CAP, HALF_LIFE_S, 600, namespace="after-erasure")
    await rebuild.rebuild(client, tenant, again, HALF_LIFE_S)
    rebuilt = await batch.read_projections(client, tenant, "after-erasure")
    assert victim not in rebuilt.projected.outcomes and victim not in rebuilt.projected.shares
    assert batch.compare(live, rebuilt, HALF_LIFE_S) == []
    # The audit record: who, when, what, how many; not the raw id.
    records = cast(list[Entry], await client.xrange(keys.audit(tenant)))
    assert len(records) == 1
    position, record = records[0]
    assert position.decode() == erased.audit_position
    fields = {k.decode(): v.decode() for k, v in record.items()}
    assert fields["action"] == "erase_user" and fields["subject"] == digest
    assert fields["requested_by"] == "test-operator" and fields["peer"]
    assert abs(int(fields["at_ms"]) - time.time() * 1000) < 60_000
    assert {k: int(fields[k]) for k in ("events", "dead_letters", "items_recomputed")} == {
        "events": 8,
        "dead_letters": 1,
        "items_recomputed": 4,
    }
    assert victim.encode() not in repr(record).encode()
    # Erasing again finds nothing, and is audited again.
    second = await erase(events, tenant, victim)
    assert (second.events, second.projections, second.items_recomputed) == (0, 0, 0)
    assert await client.xlen(keys.audit(tenant)) == 2


async def test_an_unknown_user_is_a_no_op_that_is_still_audited(
    client: AsyncRedis, events: events_pb2_grpc.EventServiceAsyncStub
) -> None:
    tenant = "er" + uuid.uuid4().hex[:8]
    reader = projector(client, tenant)
    await reader.prepare()
    now = int(time.time() * 1000)
    await append(events, tenant, event("click", "bob", 1, now), event("impression", "bob", 2, now))
    await drain(reader)
    before = await dump(client, tenant)

    erased = await erase(events, tenant, "nobody", by="ops@example")

    assert erased.subject == "sha256:" + hashlib.sha256(b"nobody").hexdigest()
    assert (
        erased.events,
        erased.dead_letters,
        erased.projections,
        erased.snapshot_entries,
        erased.feature_keys,
        erased.items_recomputed,
    ) == (0, 0, 0, 0, 0, 0)
    after = await dump(client, tenant)
    audit = after.pop(keys.audit(tenant))
    assert after == before
    assert b"ops@example" in audit and b"nobody" not in audit


@pytest.mark.parametrize(
    ("user", "by", "field"),
    [
        ("", "ops", "user_id"),
        ("u" * (MAX_USER_ID_BYTES + 1), "ops", "user_id"),
        ("u1", "", "requested_by"),
        ("u1", "o" * 257, "requested_by"),
    ],
)
async def test_bad_input_is_invalid_argument_and_erases_nothing(
    client: AsyncRedis,
    events: events_pb2_grpc.EventServiceAsyncStub,
    user: str,
    by: str,
    field: str,
) -> None:
    tenant = "er" + uuid.uuid4().hex[:8]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await erase(events, tenant, user, by=by)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers.get("x-recmesh-field") == field
    assert not await client.exists(keys.audit(tenant))


async def test_counters_stay_exact_while_the_projector_lags(
    client: AsyncRedis, events: events_pb2_grpc.EventServiceAsyncStub
) -> None:
    """Entries the projector has not applied when the counters are rewritten (read by a
    replica that crashed before applying, or not read at all) are applied afterwards on
    top of the rewrite, and those it applied but did not acknowledge are not counted
    twice: after it catches up, the projections equal a recompute."""
    tenant = "er" + uuid.uuid4().hex[:8]
    victim = "victim-" + uuid.uuid4().hex
    reader = projector(client, tenant, claim_idle_s=0.0)
    await reader.prepare()
    now = int(time.time() * 1000) - 30 * MINUTE_MS
    await append(
        events,
        tenant,
        event("click", victim, 1, now),
        event("impression", victim, 1, now + 1),
        event("click", "bob", 1, now + 2),
    )
    await drain(reader)
    stream = keys.events(tenant)
    read_not_applied, applied_not_acked, not_read = (
        event("impression", "bob", 1, now + MINUTE_MS),
        event("click", "bob", 1, now + 2 * MINUTE_MS),
        event("click", "carol", 1, now + 3 * MINUTE_MS),
    )
    await append(events, tenant, read_not_applied, applied_not_acked, not_read)
    # A replica that crashed after reading one entry; another after applying the next.
    await client.xreadgroup("projector", "crashed", {stream: ">"}, count=1)
    await client.xreadgroup("projector", "crashed-later", {stream: ">"}, count=1)
    await Projections(client, CAP, HALF_LIFE_S, 600).apply(tenant, [applied_not_acked])

    erased = await erase(events, tenant, victim)

    assert (erased.events, erased.items_recomputed) == (2, 1)
    await reader.claim_once()
    await drain(reader)
    assert int((await client.xpending(stream, "projector"))["pending"]) == 0
    assert await batch.verify(client, [tenant], HALF_LIFE_S, CAP) == {tenant: []}


async def test_erasing_while_the_projector_runs_and_events_arrive_keeps_the_counters_exact(
    client: AsyncRedis, events: events_pb2_grpc.EventServiceAsyncStub
) -> None:
    tenant = "er" + uuid.uuid4().hex[:8]
    victim = "victim-" + uuid.uuid4().hex
    reader = projector(client, tenant)
    await reader.prepare()
    now = int(time.time() * 1000) - 30 * MINUTE_MS
    await append(
        events,
        tenant,
        *(
            event(kind, victim, item, now + item)
            for item in range(20)
            for kind in ("impression", "click")
        ),
    )
    for start in range(0, 3000, 1000):  # a longer log: the first read of it races the projector
        await append(
            events,
            tenant,
            *(
                event("impression", "carol", 100 + n % 50, now + n)
                for n in range(start, start + 1000)
            ),
        )
    await drain(reader)
    await reader.start()
    stop = asyncio.Event()

    async def traffic() -> int:
        sent = 0
        while not stop.is_set():
            await append(
                events,
                tenant,
                *(event("click", "bob", item, now + MINUTE_MS + sent) for item in range(20)),
            )
            sent += 1
            await asyncio.sleep(0.002)
        return sent

    sender = asyncio.create_task(traffic())
    try:
        await asyncio.sleep(0.05)
        erased = await erase(events, tenant, victim)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        sent = await sender
    for _ in range(200):
        if (await reader.lag(tenant)).events == 0 and not int(
            (await client.xpending(keys.events(tenant), "projector"))["pending"]
        ):
            break
        await asyncio.sleep(0.02)
    await reader.stop()
    assert sent > 0 and (erased.events, erased.items_recomputed) == (40, 20)
    assert await batch.verify(client, [tenant], HALF_LIFE_S, CAP) == {tenant: []}
