"""Delivery of the gateway's own events (the impressions of its answers) to the event logger.

The gateway writes about ten impressions per answer. Storing each answer's impressions in
the SQLite outbox, reading them back and deleting them once delivered cost the gateway a
fifth of its CPU per request, for events that no client is waiting on. So they take the
short way when it is open, and the durable way when it is not:

* :meth:`ImpressionShipper.put` queues events in memory with the traceparent of the span
  that produced them and returns at once;
* one flusher sends each tenant's queued events as one ``Append`` once ``batch_rows`` are
  queued or ``linger_s`` after the first of them, one batch at a time, inside an
  ``impressions.deliver`` span of its own trace linked to every producing span;
* a batch the event logger did not acknowledge goes to the outbox, and so does every batch
  while the outbox holds rows, behind them, so each tenant's events reach the log in the
  order they were produced; the outbox relay delivers them later.

What this trades: events queued and not yet sent (at most ``linger_s`` worth, plus the batch
in flight) are lost if the process is killed with SIGKILL. A SIGTERM flushes them
(:meth:`ImpressionShipper.stop`). Events clients post (``POST /v1/events``) do not come
here: they are answered 202 only once stored in the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field

from recmesh.events.v1 import events_pb2

from gateway.metrics import IMPRESSIONS
from gateway.outbox import Outbox, Send, send_linked
from mesh import tracing
from mesh.client import describe_failure

log = logging.getLogger(__name__)


@dataclass
class _Queued:
    events: list[events_pb2.Event] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)


class ImpressionShipper:
    """Batches events per tenant to ``send``, falling back to ``outbox`` (module docstring).

    Args:
        outbox: where events go when they cannot be sent now.
        send: delivers one tenant's batch (the tenant is in the context); raises when not.
        batch_rows: queued events of one tenant that trigger a send without waiting.
        linger_s: longest wait between the first queued event and its send.
    """

    def __init__(
        self, outbox: Outbox, send: Send, batch_rows: int = 200, linger_s: float = 0.02
    ) -> None:
        self._outbox = outbox
        self._send = send
        self._batch_rows = max(1, batch_rows)
        self._linger_s = linger_s
        self._queued: defaultdict[str, _Queued] = defaultdict(_Queued)
        self._size = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def put(self, tenant: str, events: list[events_pb2.Event]) -> None:
        """Queue ``events`` of ``tenant`` with the current span's traceparent; never blocks."""
        if not events:
            return
        queued = self._queued[tenant]
        queued.events.extend(events)
        queued.traces.extend([tracing.current_traceparent()] * len(events))
        self._size += len(events)
        if len(queued.events) >= self._batch_rows or self._size == len(events):
            self._wake.set()

    async def start(self) -> None:
        """Run the flusher in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the flusher finish the batch it is delivering, then deliver (send, or store in
        the outbox) whatever is still queued. Call before the outbox closes."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            full = any(len(q.events) >= self._batch_rows for q in self._queued.values())
            if not (full or self._closing):
                await asyncio.sleep(self._linger_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Deliver every queued event now: sent, or stored in the outbox."""
        queued, self._queued = self._queued, defaultdict(_Queued)
        self._size = 0
        for tenant, batch in queued.items():
            await self._deliver(tenant, batch)

    async def _deliver(self, tenant: str, batch: _Queued) -> None:
        if not self._outbox.holds_rows:
            try:
                await send_linked(
                    "impressions.deliver", tenant, batch.events, batch.traces, self._send
                )
                IMPRESSIONS.labels("sent").inc(len(batch.events))
                return
            except Exception as exc:
                log.warning(
                    "impressions not delivered, keeping them in the outbox: %s",
                    describe_failure(exc),
                )
        try:
            await self._outbox.put(tenant, batch.events, batch.traces)
            IMPRESSIONS.labels("outbox").inc(len(batch.events))
        except (OSError, sqlite3.Error) as exc:
            IMPRESSIONS.labels("lost").inc(len(batch.events))
            log.error("impressions lost: the outbox could not store them: %s", exc)
