"""Impressions reach the event log straight away, or through the outbox when they cannot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from recmesh.events.v1 import events_pb2, events_pb2_grpc

from gateway.impressions import ImpressionShipper
from gateway.outbox import Outbox, OutboxRelay
from mesh.client import Downstream
from mesh.ports import free_port
from mesh.testing import built_server, serving, tenant_metadata
from services.events.server import build_service
from services.events.settings import EventsSettings


def impression(request: str, position: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"{request}:{position}",
        type="impression",
        user_id="u1",
        item_id=position + 1,
        request_id=request,
        ts_ms=int(time.time() * 1000),
        position=position,
    )


class Logger:
    """The events service on a fixed port (started and stopped by the test), a downstream
    to it, and a count of the batches sent."""

    def __init__(self, port: int, redis_url: str) -> None:
        self.port = port
        self.redis_url = redis_url
        self.events = Downstream.open(
            "events", f"127.0.0.1:{port}", events_pb2_grpc.EventServiceStub
        )
        self.batches: list[int] = []

    async def send(self, batch: list[events_pb2.Event]) -> object:
        self.batches.append(len(batch))
        return await self.events.call(
            self.events.stub.Append,
            events_pb2.AppendRequest(events=batch),
            cap_s=1.0,
            idempotent=True,
        )

    async def stored_once(self, tenant: str, count: int, timeout_s: float = 4.0) -> list[str]:
        """The ids in ``tenant``'s log once it holds ``count`` events (or at ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        ids = await self.stored(tenant)
        for _ in range(int(timeout_s / 0.02)):
            if len(ids) >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
            ids = await self.stored(tenant)
        return ids

    async def stored(self, tenant: str) -> list[str]:
        """Ids of every event in ``tenant``'s log, in log order (read 1000 at a time)."""
        ids: list[str] = []
        after = ""
        while True:
            reply = await self.events.stub.Read(
                events_pb2.ReadRequest(after=after, limit=1000), metadata=tenant_metadata(tenant)
            )
            ids += [e.event.event_id for e in reply.events]
            if len(reply.events) < 1000:
                return ids
            after = reply.events[-1].position


@pytest.fixture
async def logger(redis_url: str) -> AsyncIterator[Logger]:
    logger = Logger(free_port(), redis_url)
    yield logger
    await logger.events.close()


def routed(route: str) -> float:
    """Impressions counted on ``route`` so far (``recmesh_gateway_impressions_total``)."""
    return REGISTRY.get_sample_value("recmesh_gateway_impressions_total", {"route": route}) or 0.0


def fresh_tenant() -> str:
    return f"im{time.time_ns() % 10**12}"


async def test_impressions_are_sent_in_batches_without_touching_the_outbox(
    tmp_path: Path, logger: Logger
) -> None:
    tenant = fresh_tenant()
    outbox = Outbox(tmp_path / "outbox.db")
    # A linger far longer than the puts take, even on a busy machine.
    shipper = ImpressionShipper(outbox, logger.send, batch_rows=1000, linger_s=0.5)
    sent_before, outbox_before = routed("sent"), routed("outbox")
    server = await built_server(
        build_service, EventsSettings(port=logger.port, redis_url=logger.redis_url)
    )
    async with serving(server):
        await shipper.start()
        for request in range(20):
            shipper.put(tenant, [impression(f"r{request}", p) for p in range(10)])
            await asyncio.sleep(0.001)  # the answers arrive over 20+ ms, within the linger
        # The flusher sends once the linger is over, without a stop.
        stored = await logger.stored_once(tenant, 200)
        await shipper.stop()
    assert stored == [f"r{r}:{p}" for r in range(20) for p in range(10)]
    assert (routed("sent") - sent_before, routed("outbox") - outbox_before) == (200, 0)
    assert logger.batches == [200]  # one Append for the 20 answers queued within the linger
    assert not outbox.holds_rows
    assert await outbox.take(10) == []
    outbox.close()


async def test_impressions_go_to_the_outbox_while_the_logger_is_down_and_arrive_in_order(
    tmp_path: Path, logger: Logger
) -> None:
    tenant = fresh_tenant()
    outbox = Outbox(tmp_path / "outbox.db")
    shipper = ImpressionShipper(outbox, logger.send, batch_rows=5, linger_s=0.01)
    relay = OutboxRelay(outbox, logger.send, idle_s=0.02, max_backoff_s=0.1)
    outbox_before = routed("outbox")
    await shipper.start()
    await relay.start()
    shipper.put(tenant, [impression("down", p) for p in range(10)])
    # Both batches of 5 stored (each is counted once its commit returned).
    for _ in range(100):
        if routed("outbox") - outbox_before == 10:
            break
        await asyncio.sleep(0.02)
    assert await outbox.depth() == 10  # nothing listens on the port: all kept
    assert routed("outbox") - outbox_before == 10

    server = await built_server(
        build_service, EventsSettings(port=logger.port, redis_url=logger.redis_url)
    )
    async with serving(server):
        shipper.put(tenant, [impression("up", p) for p in range(10)])
        for _ in range(200):  # the relay first, then (its channel connected) the reads
            if not outbox.holds_rows and len(await logger.stored(tenant)) == 20:
                break
            await asyncio.sleep(0.05)
        stored = await logger.stored(tenant)
        await shipper.stop()
        await relay.stop()
    assert stored == [f"down:{p}" for p in range(10)] + [f"up:{p}" for p in range(10)]


async def test_stop_delivers_what_is_still_queued(tmp_path: Path, logger: Logger) -> None:
    tenant = fresh_tenant()
    outbox = Outbox(tmp_path / "outbox.db")
    shipper = ImpressionShipper(outbox, logger.send, batch_rows=1000, linger_s=60.0)
    server = await built_server(
        build_service, EventsSettings(port=logger.port, redis_url=logger.redis_url)
    )
    async with serving(server):
        await shipper.start()
        shipper.put(tenant, [impression("late", p) for p in range(3)])
        await asyncio.sleep(0.01)  # the flusher is waiting out its linger
        started = time.monotonic()
        await shipper.stop()  # ends the linger instead of waiting it out
        stopped_after_s = time.monotonic() - started
        stored = await logger.stored(tenant)
    assert stored == [f"late:{p}" for p in range(3)]
    assert stopped_after_s < 30.0
    outbox.close()


async def test_a_full_batch_is_sent_before_the_linger_and_no_append_exceeds_it(
    tmp_path: Path, logger: Logger
) -> None:
    tenant = fresh_tenant()
    outbox = Outbox(tmp_path / "outbox.db")
    shipper = ImpressionShipper(outbox, logger.send, batch_rows=1000, linger_s=60.0)
    server = await built_server(
        build_service, EventsSettings(port=logger.port, redis_url=logger.redis_url)
    )
    async with serving(server):
        await shipper.start()
        await asyncio.sleep(0)
        shipper.put(tenant, [impression("big", p) for p in range(2500)])
        stored = await logger.stored_once(tenant, 2500)  # well before the 60 s linger
        await shipper.stop()
    assert stored == [f"big:{p}" for p in range(2500)]
    assert logger.batches == [1000, 1000, 500]  # the events service takes 1000 per call
    assert not outbox.holds_rows
    outbox.close()


async def test_the_flusher_survives_a_round_that_fails(tmp_path: Path, logger: Logger) -> None:
    tenant = fresh_tenant()
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.close()  # every store in the outbox fails now, and the logger is down too
    shipper = ImpressionShipper(outbox, logger.send, batch_rows=10, linger_s=0.01)
    lost_before = routed("lost")
    await shipper.start()
    shipper.put(tenant, [impression("first", p) for p in range(10)])
    for _ in range(100):
        if routed("lost") - lost_before == 10:
            break
        await asyncio.sleep(0.02)
    assert routed("lost") - lost_before == 10
    server = await built_server(
        build_service, EventsSettings(port=logger.port, redis_url=logger.redis_url)
    )
    async with serving(server):  # the logger is back: the same flusher delivers again
        stored: list[str] = []
        for attempt in range(100):  # until the channels have reconnected
            shipper.put(tenant, [impression(f"again{attempt}", p) for p in range(10)])
            await asyncio.sleep(0.05)
            with contextlib.suppress(grpc.aio.AioRpcError):
                stored = await logger.stored(tenant)
            if stored:
                break
        await shipper.stop()
    assert stored and not any(event_id.startswith("first") for event_id in stored)


async def test_a_stop_while_the_logger_is_down_keeps_the_queue_in_the_outbox(
    tmp_path: Path, logger: Logger
) -> None:
    tenant = fresh_tenant()
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    shipper = ImpressionShipper(outbox, logger.send, batch_rows=1000, linger_s=60.0)
    await shipper.start()
    shipper.put(tenant, [impression("kept", p) for p in range(4)])
    await shipper.stop()
    outbox.close()
    reopened = Outbox(path)
    rows = await reopened.take(10)
    assert [(t, e.event_id) for _, t, e in rows] == [(tenant, f"kept:{p}") for p in range(4)]
    reopened.close()
