"""The outbox keeps accepted events through an events-service outage and a restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from recmesh.events.v1 import events_pb2, events_pb2_grpc

from core.catalog import delete_event
from gateway.outbox import Outbox, OutboxRelay
from mesh.client import Downstream
from mesh.context import tenant_var
from mesh.ports import free_port
from mesh.testing import built_server, serving, tenant_metadata
from services.events.server import build_service
from services.events.settings import EventsSettings


def click(n: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"outbox-{n}", type="click", user_id="u1", item_id=n, ts_ms=int(time.time() * 1000)
    )


async def test_rows_survive_reopening_the_file(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    await outbox.put("demo", [click(1), click(2)])
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.db")
    rows = await reopened.take(10)
    assert [(t, e.event_id) for _, t, e in rows] == [("demo", "outbox-1"), ("demo", "outbox-2")]
    reopened.close()


async def test_catalog_events_are_taken_before_a_backlog_of_other_events(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    await outbox.put("demo", [click(n) for n in range(5)])
    first, second = delete_event("sku-1", 1), delete_event("sku-2", 2)
    await outbox.put("demo", [first, click(5), second])
    taken = [e.event_id for _, _, e in await outbox.take(4)]
    # The catalog lane first, in its own order; then the others, in theirs.
    assert taken == [first.event_id, second.event_id, "outbox-0", "outbox-1"]
    outbox.close()


async def test_a_file_from_before_the_lanes_is_read_with_its_rows_in_the_events_lane(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,"
        " event BLOB NOT NULL, trace TEXT NOT NULL DEFAULT '')"
    )
    old.execute(
        "INSERT INTO outbox (tenant, event) VALUES (?, ?)", ("demo", click(1).SerializeToString())
    )
    old.commit()
    old.close()

    outbox = Outbox(path)
    await outbox.put("demo", [delete_event("sku-1", 1)])
    assert [e.type for _, _, e in await outbox.take(10)] == ["item_delete", "click"]
    outbox.close()


async def test_events_accepted_while_the_logger_is_down_are_delivered_once_it_is_back(
    tmp_path: Path, redis_url: str
) -> None:
    tenant = f"ob{int(time.time() * 1000) % 10**9}"
    port = free_port()
    events = Downstream.open("events", f"127.0.0.1:{port}", events_pb2_grpc.EventServiceStub)

    async def send(batch: list[events_pb2.Event]) -> object:
        return await events.call(
            events.stub.Append, events_pb2.AppendRequest(events=batch), cap_s=1.0, idempotent=True
        )

    outbox = Outbox(tmp_path / "outbox.db")
    relay = OutboxRelay(outbox, send, idle_s=0.02, max_backoff_s=0.1)
    await relay.start()
    tenant_var.set(tenant)
    await outbox.put(tenant, [click(n) for n in range(50)])
    await asyncio.sleep(0.3)
    assert await outbox.depth() == 50  # nothing listens on the port: all kept

    server = await built_server(build_service, EventsSettings(port=port, redis_url=redis_url))
    async with serving(server):
        for _ in range(100):
            if await outbox.depth() == 0:
                break
            await asyncio.sleep(0.05)
        await outbox.put(tenant, [click(0), click(50)])  # a repeat and a new one
        for _ in range(100):
            if await outbox.depth() == 0:
                break
            await asyncio.sleep(0.05)
        reply = await events.stub.Read(
            events_pb2.ReadRequest(limit=1000), metadata=tenant_metadata(tenant)
        )
    await relay.stop()
    await events.close()
    ids = [e.event.event_id for e in reply.events]
    assert ids == [f"outbox-{n}" for n in range(51)]


async def test_concurrent_puts_share_commits_and_every_row_is_stored(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    await asyncio.gather(
        *(outbox.put(f"t{n % 3}", [click(2 * n), click(2 * n + 1)]) for n in range(40))
    )
    rows = await outbox.take(1000)
    assert len(rows) == 80
    assert sorted(e.event_id for _, _, e in rows) == sorted(f"outbox-{n}" for n in range(80))
    by_put = {e.event_id: t for _, t, e in rows}
    assert all(by_put[f"outbox-{2 * n}"] == f"t{n % 3}" for n in range(40))
    outbox.close()


async def test_a_failed_commit_fails_every_put_waiting_on_it(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.close()  # every commit now fails
    results = await asyncio.gather(
        *(outbox.put("demo", [click(n)]) for n in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, sqlite3.Error) for r in results)


async def test_an_event_the_events_service_refuses_is_set_aside_and_the_rest_flows_on(
    tmp_path: Path, redis_url: str
) -> None:
    """A rule that differs between gateway and events service must not jam the outbox:
    the refused event is kept in the refused table, every other row is delivered."""
    tenant, other = f"or{time.time_ns() % 10**9}", f"os{time.time_ns() % 10**9}"
    port = free_port()
    events = Downstream.open("events", f"127.0.0.1:{port}", events_pb2_grpc.EventServiceStub)

    async def send(batch: list[events_pb2.Event]) -> object:
        return await events.call(
            events.stub.Append, events_pb2.AppendRequest(events=batch), cap_s=1.0, idempotent=True
        )

    outbox = Outbox(tmp_path / "outbox.db")
    bad = click(1)
    bad.type = "teleport"
    await outbox.put(tenant, [click(0), bad, click(2)])
    await outbox.put(other, [click(3)])
    relay = OutboxRelay(outbox, send, idle_s=0.02, max_backoff_s=0.1)
    server = await built_server(build_service, EventsSettings(port=port, redis_url=redis_url))
    async with serving(server):
        await relay.start()
        for _ in range(100):
            if await outbox.depth() == 0:
                break
            await asyncio.sleep(0.05)
        stored = {
            name: [
                e.event.event_id
                for e in (
                    await events.stub.Read(
                        events_pb2.ReadRequest(limit=100), metadata=tenant_metadata(name)
                    )
                ).events
            ]
            for name in (tenant, other)
        }
    await relay.stop()
    await events.close()
    assert stored == {tenant: ["outbox-0", "outbox-2"], other: ["outbox-3"]}
    reopened = Outbox(tmp_path / "outbox.db")
    [(who, event, reason)] = reopened.refused()
    assert (who, event.event_id) == (tenant, "outbox-1")
    assert reason.startswith("INVALID_ARGUMENT") and "type" in reason
    reopened.close()
