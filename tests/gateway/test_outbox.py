"""The outbox keeps accepted events through an events-service outage and a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from recmesh.events.v1 import events_pb2, events_pb2_grpc

from gateway.outbox import Outbox, OutboxRelay
from mesh.client import Downstream
from mesh.context import tenant_var
from mesh.testing import serving, tenant_metadata
from services.events.server import build_server
from services.events.settings import EventsSettings
from tests.conftest import free_port


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


async def test_events_accepted_while_the_logger_is_down_are_delivered_once_it_is_back(
    tmp_path: Path, redis_url: str
) -> None:
    tenant = f"ob{int(time.time() * 1000) % 10**9}"
    port = free_port()
    events = Downstream("events", f"127.0.0.1:{port}", events_pb2_grpc.EventServiceStub)

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

    server = await build_server(EventsSettings(port=port, redis_url=redis_url))
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
