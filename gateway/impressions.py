"""Delivery of the gateway's own events (the impressions of its answers) to the event logger.

The gateway writes about ten impressions per answer. Storing each answer's impressions in
the SQLite outbox, reading them back and deleting them once delivered cost the gateway a
fifth of its CPU per request, for events that no client is waiting on. So they take the
short way when it is open, and the durable way when it is not:

* :meth:`ImpressionShipper.put` queues events in memory with the traceparent of the span
  that produced them and returns at once;
* one flusher sends each tenant's queued events once ``batch_rows`` of one tenant are
  queued or ``linger_s`` after the first of them, in ``Append`` calls of at most
  ``batch_rows`` events, one call at a time, each inside an ``impressions.deliver`` span
  of its own trace linked to every producing span;
* a batch the event logger did not acknowledge goes to the outbox, and so does every batch
  while the outbox holds rows, behind them, so each tenant's events reach the log in the
  order they were produced; the outbox relay delivers them later.

What this trades: events queued and not yet sent are lost if the process is killed with
SIGKILL: ``linger_s`` worth when the event logger answers promptly, and, while a send is
slow, everything produced until it answers or fails (each attempt is bounded by the
gateway's ``events_timeout_s``, 1 s by default). A SIGTERM flushes them
(:meth:`ImpressionShipper.stop`). The flusher survives any failure of a round (logged);
events the outbox could not store are counted as lost. Events clients post (``POST
/v1/events``) do not come here: they are answered 202 only once stored in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import Counter
from recmesh.events.v1 import events_pb2

from core.events import MAX_BATCH
from gateway.outbox import Outbox, Send, send_linked
from mesh import tracing
from mesh.client import describe_failure

log = logging.getLogger(__name__)

IMPRESSIONS = Counter(
    "recmesh_gateway_impressions_total",
    "Impressions of answers by route: sent straight to the event logger, stored in the outbox "
    "(delivery failed or the outbox held rows), or lost (the outbox could not store them)",
    ["route"],
)


@dataclass
class _Queued:
    events: list[events_pb2.Event] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)


class ImpressionShipper:
    """Batches events per tenant to ``send``, falling back to ``outbox`` (module docstring).

    Args:
        outbox: where events go when they cannot be sent now.
        send: delivers one tenant's batch (the tenant is in the context); raises when not.
        batch_rows: queued events of one tenant that end the linger, and the most events
            one ``Append`` carries (at most the events service's 1000 per call).
        linger_s: longest wait between the first queued event and its send.

    Raises:
        ValueError: ``batch_rows`` outside 1..1000.
    """

    def __init__(self, outbox: Outbox, send: Send, batch_rows: int, linger_s: float) -> None:
        if not 1 <= batch_rows <= MAX_BATCH:
            raise ValueError(f"batch_rows must be in 1..{MAX_BATCH}, got {batch_rows}")
        self._outbox = outbox
        self._send = send
        self._batch_rows = batch_rows
        self._linger_s = linger_s
        self._queued: defaultdict[str, _Queued] = defaultdict(_Queued)
        self._size = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
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
        self._wake.set()
        if len(queued.events) >= self._batch_rows:
            self._full.set()

    async def start(self) -> None:
        """Run the flusher in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the flusher finish the batch it is delivering, then deliver (send, or store in
        the outbox) whatever is still queued. Call before the outbox closes."""
        self._closing = True
        self._wake.set()
        self._full.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            self._task = None
            await self.flush()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._linger_s)
            self._wake.clear()
            self._full.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("impression flush failed; the flusher carries on")

    async def flush(self) -> None:
        """Deliver every queued event now: sent, or stored in the outbox."""
        queued, self._queued = self._queued, defaultdict(_Queued)
        self._size = 0
        for tenant, batch in queued.items():
            for start in range(0, len(batch.events), self._batch_rows):
                stop = start + self._batch_rows
                await self._deliver(tenant, batch.events[start:stop], batch.traces[start:stop])

    async def _deliver(
        self, tenant: str, events: list[events_pb2.Event], traces: list[str]
    ) -> None:
        if not self._outbox.holds_rows:
            try:
                await send_linked("impressions.deliver", tenant, events, traces, self._send)
                IMPRESSIONS.labels("sent").inc(len(events))
                return
            except Exception as exc:
                log.warning(
                    "impressions not delivered, keeping them in the outbox: %s",
                    describe_failure(exc),
                )
        try:
            await self._outbox.put(tenant, events, traces)
            IMPRESSIONS.labels("outbox").inc(len(events))
        except Exception as exc:
            IMPRESSIONS.labels("lost").inc(len(events))
            log.error("impressions lost: the outbox could not store them: %s", exc)
