"""The durable outbox: events the gateway accepted, kept on local disk until delivered.

``POST /v1/events`` answers 202 only after its events are committed to an SQLite file
(WAL journal, ``synchronous=FULL``: the commit is fsynced). A relay task delivers them
to the events service in order, in batches per tenant, and deletes them only once the
events service acknowledged the batch. Delivery is at least once; the events service
drops repeats by event id, so the effect is exactly once. A gateway killed after a 202
finds the rows again on restart. A batch the events service refuses as invalid (a rule
that differs between the two) is delivered one event at a time, and each event refused
alone moves to the file's ``refused`` table with the reason: it never holds back the
rows of other requests and tenants behind it.

Catalog events (``item_upsert``, ``item_delete``) travel in a lane of their own: the relay
takes them before any other row, so an item write or withdrawal never waits behind a
backlog of clients' events (the live catalog's 1 s bar). Each lane keeps its order; the
order between the lanes does not matter (a catalog event and a user's event never decide
each other's outcome).

Each row keeps the W3C ``traceparent`` of the span that stored it (the request's
``stage.impressions`` span, or the ``POST /v1/events`` span). A delivery round is its own
trace — a batch mixes rows of many requests and may run after retries or a restart — and
its ``outbox.deliver`` span links to every stored row's span (a span link, as the
OpenTelemetry messaging conventions do for batches).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from opentelemetry.trace import Link
from prometheus_client import Counter, Gauge
from recmesh.events.v1 import events_pb2

from core.catalog import CATALOG_TYPES
from mesh import tracing
from mesh.client import describe_failure
from mesh.context import tenant_var
from mesh.errors import InvalidArgument

log = logging.getLogger(__name__)

CATALOG_LANE, EVENTS_LANE = 0, 1
"""The outbox's lanes, in the order the relay takes them."""

OUTBOX_DEPTH = Gauge("recmesh_gateway_outbox_depth", "Events accepted and not yet delivered")
REFUSED = Counter(
    "recmesh_gateway_outbox_refused_total",
    "Accepted events the events service refused as invalid on delivery (kept in the "
    "outbox file's refused table; a rule that differs between gateway and events service)",
)

Send = Callable[[list[events_pb2.Event]], Awaitable[object]]
"""Delivers one tenant's batch (the tenant is in the context); raises when not delivered."""


class Outbox:
    """An SQLite-backed FIFO of ``(tenant, event)`` rows; all methods are coroutine-safe."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, event BLOB NOT NULL,"
            " trace TEXT NOT NULL DEFAULT '')"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refused ("
            " id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, event BLOB NOT NULL,"
            " reason TEXT NOT NULL, refused_at REAL NOT NULL)"
        )
        self._pending: list[tuple[list[tuple[str, bytes, str, int]], asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "trace" not in columns:  # a file written before rows carried their trace
            self._db.execute("ALTER TABLE outbox ADD COLUMN trace TEXT NOT NULL DEFAULT ''")
        if "lane" not in columns:  # a file written before catalog events had their lane
            self._db.execute(
                f"ALTER TABLE outbox ADD COLUMN lane INTEGER NOT NULL DEFAULT {EVENTS_LANE}"
            )
        self._db.execute("CREATE INDEX IF NOT EXISTS outbox_by_lane ON outbox (lane, id)")
        self._rows = self._depth()
        OUTBOX_DEPTH.set(self._rows)

    def _depth(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def _insert(self, rows: Sequence[tuple[str, bytes, str, int]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO outbox (tenant, event, trace, lane) VALUES (?, ?, ?, ?)", rows
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def rows(self) -> int:
        """Rows stored and not yet acknowledged (counted in memory, no query)."""
        return self._rows

    @property
    def holds_rows(self) -> bool:
        """Whether rows are stored and not yet acknowledged (counted in memory, no query)."""
        return self._rows > 0

    async def put(
        self,
        tenant: str,
        events: Sequence[events_pb2.Event],
        traces: Sequence[str] | None = None,
    ) -> None:
        """Store ``events`` durably (returns after the fsynced commit), each with its W3C
        ``traceparent``: ``traces[i]`` for ``events[i]``, or the current span's when
        ``traces`` is None.

        Group commit: rows of puts that arrive while a commit is running wait for the next
        one, and share it, so the outbox costs one fsync per commit, not one per request.

        Raises:
            OSError / sqlite3.Error: the commit failed; none of ``events`` was stored.
        """
        if traces is None:
            traces = [tracing.current_traceparent()] * len(events)
        rows = [
            (
                tenant,
                e.SerializeToString(),
                tp,
                CATALOG_LANE if e.type in CATALOG_TYPES else EVENTS_LANE,
            )
            for e, tp in zip(events, traces, strict=True)
        ]
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, stored))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_pending())
        await stored
        self._rows += len(events)
        OUTBOX_DEPTH.set(self._rows)

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._insert, [row for rows, _ in batch for row in rows])
            except (OSError, sqlite3.Error) as exc:
                for _, stored in batch:
                    if not stored.done():
                        stored.set_exception(exc)
            else:
                for _, stored in batch:
                    if not stored.done():
                        stored.set_result(None)

    def _take(self, limit: int) -> list[tuple[int, str, bytes, str]]:
        with self._lock:
            return self._db.execute(
                "SELECT id, tenant, event, trace FROM outbox ORDER BY lane, id LIMIT ?", (limit,)
            ).fetchall()

    async def take_traced(self, limit: int) -> list[tuple[int, str, events_pb2.Event, str]]:
        """The oldest ``limit`` rows (the catalog lane's first), not removed, each with the
        traceparent it was stored with."""
        rows = await asyncio.to_thread(self._take, limit)
        return [(i, t, events_pb2.Event.FromString(blob), tp) for i, t, blob, tp in rows]

    async def take(self, limit: int) -> list[tuple[int, str, events_pb2.Event]]:
        """The oldest ``limit`` rows (the catalog lane's first), not removed."""
        return [(i, t, e) for i, t, e, _ in await self.take_traced(limit)]

    def _ack(self, ids: Sequence[int]) -> None:
        # One transaction, so one fsync per batch: in autocommit every DELETE would commit
        # (and fsync) on its own, ~1 s for 500 rows, while ``put`` waits on the lock.
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    async def ack(self, ids: Sequence[int]) -> None:
        """Remove delivered rows."""
        await asyncio.to_thread(self._ack, ids)
        self._rows = max(0, self._rows - len(ids))
        OUTBOX_DEPTH.set(self._rows)

    def _refuse(self, row_id: int, reason: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO refused (id, tenant, event, reason, refused_at)"
                    " SELECT id, tenant, event, ?, ? FROM outbox WHERE id = ?",
                    (reason, time.time(), row_id),
                )
                self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    async def refuse(self, row_id: int, reason: str) -> None:
        """Move a row the events service refused (invalid there) out of the queue into the
        ``refused`` table, with the reason, in one transaction: it no longer holds back
        the rows behind it, and it is kept for an operator, not dropped."""
        await asyncio.to_thread(self._refuse, row_id, reason)
        self._rows = max(0, self._rows - 1)
        OUTBOX_DEPTH.set(self._rows)
        REFUSED.inc()

    def refused(self) -> list[tuple[str, events_pb2.Event, str]]:
        """The rows the events service refused: tenant, event and reason, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, event, reason FROM refused ORDER BY id"
            ).fetchall()
        return [(t, events_pb2.Event.FromString(e), r) for t, e, r in rows]

    async def depth(self) -> int:
        """Rows not yet delivered."""
        return await asyncio.to_thread(self._depth)

    def close(self) -> None:
        with self._lock:
            self._db.close()


async def send_linked(
    span_name: str,
    tenant: str,
    events: list[events_pb2.Event],
    traces: Sequence[str],
    send: Send,
) -> None:
    """Send one tenant's batch inside a new trace's ``span_name`` span that links to the span
    each event was accepted in (``traces``: their W3C traceparents).

    Raises:
        Exception: whatever ``send`` raises (the batch was not delivered).
    """
    tenant_var.set(tenant)
    links = {tp: tracing.link_to(tp) for tp in traces}
    with tracing.tracer.start_as_current_span(
        span_name,
        context=tracing.ROOT,
        links=[link for link in links.values() if isinstance(link, Link)],
        attributes=tracing.recmesh_attributes(tenant=tenant, events=len(events)),
    ):
        await send(events)


def _invalid(exc: Exception) -> bool:
    """Whether a delivery failed because the events service judged the batch invalid (not
    because it could not be reached): retrying the same batch would fail forever."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    return isinstance(exc, InvalidArgument)


class OutboxRelay:
    """Moves outbox rows to the events service, retrying with capped exponential backoff.

    Args:
        outbox: the queue to drain.
        send: delivers one tenant's batch.
        batch: rows taken per round. Each round decodes and sends its rows on the event
            loop the requests share, so a large batch stalls them: when the events service
            comes back to a backlog of thousands of rows, rounds of 500 delayed answers past
            the deadline in the chaos suite; rounds of 100 keep each stall short.
        idle_s: pause when the outbox is empty.
        max_backoff_s: longest pause after failed deliveries.
    """

    def __init__(
        self,
        outbox: Outbox,
        send: Send,
        batch: int = 100,
        idle_s: float = 0.05,
        max_backoff_s: float = 2.0,
    ) -> None:
        self._outbox = outbox
        self._send = send
        self._batch = batch
        self._idle_s = idle_s
        self._max_backoff_s = max_backoff_s
        self._task: asyncio.Task[None] | None = None

    async def deliver_once(self) -> int:
        """Deliver one round; returns rows delivered.

        Raises:
            Exception: the first tenant batch that could not be delivered (earlier
                batches of the round stay delivered).
        """
        if not self._outbox.holds_rows:
            return 0
        rows = await self._outbox.take_traced(self._batch)
        delivered = 0
        for tenant, group in itertools.groupby(rows, key=lambda row: row[1]):
            batch = list(group)
            try:
                await send_linked(
                    "outbox.deliver",
                    tenant,
                    [event for _, _, event, _ in batch],
                    [tp for _, _, _, tp in batch],
                    self._send,
                )
            except Exception as exc:
                if not _invalid(exc):
                    raise
                await self._deliver_alone(tenant, batch)
            else:
                await self._outbox.ack([row_id for row_id, _, _, _ in batch])
            delivered += len(batch)
        return delivered

    async def _deliver_alone(
        self, tenant: str, batch: list[tuple[int, str, events_pb2.Event, str]]
    ) -> None:
        """Deliver a batch the events service refused as invalid one event at a time: the
        valid ones reach the log, each refused one goes to the outbox's refused table."""
        for row_id, _, event, trace in batch:
            try:
                await send_linked("outbox.deliver", tenant, [event], [trace], self._send)
            except Exception as exc:
                if not _invalid(exc):
                    raise
                log.error(
                    "the events service refused an accepted event; kept in the refused table",
                    extra={"fields": {"tenant": tenant, "event_id": event.event_id}},
                )
                await self._outbox.refuse(row_id, describe_failure(exc))
            else:
                await self._outbox.ack([row_id])

    async def _run(self) -> None:
        backoff = self._idle_s
        while True:
            try:
                delivered = await self.deliver_once()
                backoff = self._idle_s
                if delivered == 0:
                    await asyncio.sleep(self._idle_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox delivery failed, will retry: %s", describe_failure(exc))
                await asyncio.sleep(backoff)
                backoff = min(self._max_backoff_s, backoff * 2)

    async def start(self) -> None:
        """Run the relay in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop the relay after a last delivery attempt of at most ``grace_s``."""
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.deliver_once(), grace_s)
        except Exception as exc:
            log.warning("outbox kept undelivered rows at shutdown: %s", describe_failure(exc))
        self._outbox.close()
