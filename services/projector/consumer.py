"""Reading every tenant's event log as a consumer group, the way several replicas share it.

Each tenant's stream (``keys.events``) has one consumer group (``group``, created at the
start of the stream, so a new deployment projects the whole log). Every replica reads
with its own consumer name, so Redis hands each entry to one of them:

1. ``XREADGROUP ... >`` reads new entries of every tenant in one call (blocking up to
   ``block_ms``; on a cluster, one call per tenant's slot, side by side); each batch is
   applied (:class:`~services.projector.projections.Projections`, idempotent) and then
   acknowledged (``XACK``). A replica that dies between the two leaves the entries
   pending under its name; a replica names itself stably (its host name: a pod's name),
   so the restarted process reads its own pending entries first (``XREADGROUP ... 0``)
   and applies the log in order.
2. Every ``claim_idle_s / 2`` seconds ``XAUTOCLAIM`` takes over entries pending longer
   than ``claim_idle_s`` (a crashed replica's) and applies them; applying twice changes
   nothing. Entries trimmed from the stream while pending are acknowledged away.
3. An entry that cannot be applied (not a valid ``Event``) goes to the tenant's dead-letter
   stream (``keys.dead_letters``: its position, the reason, the raw bytes) and is
   acknowledged, so one poison event never blocks the stream. An event the script cannot
   apply (a key of it holds another type of value) stays pending, is claimed again, and
   after ``max_deliveries`` deliveries goes to the dead letters too.
4. The claim round also deletes the group's consumers that hold nothing and were idle
   for ``consumer_idle_s`` (replicas gone for good, e.g. pods of a scaled-down set).

The same reader serves a second stream of each tenant: the **catalog stream**
(``keys.catalog_events``), a capped copy of the catalog events the events service writes
with their append. The projector runs one reader per stream; the catalog one reads small
batches, so an upsert or a delete is applied within its read round even while the log's
reader trails thousands of impressions behind. Both apply through the same script, whose
``applied`` mark per event id makes the second application of a catalog event a no-op.
Order holds: each reader applies its stream in log order, so when one of them reaches an
event, every earlier catalog event was applied (by it, or by the other reader, which had
reached it first).

The lag is published every second per tenant and stream: entries not yet read by the group
(``XINFO GROUPS`` ``lag``) and the age of the oldest of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from prometheus_client import Counter, Gauge

from core import keys
from core.logread import Entry, as_text
from mesh.redis import AsyncRedis, slot_groups
from services.projector.projections import Dead, Projections, decoded

log = logging.getLogger(__name__)

EVENTS = Counter(
    "recmesh_projector_events_total",
    "Log entries the projector handled, by tenant and outcome: applied, duplicate (applied "
    "before: a redelivery), failed (the apply failed: left pending, retried by a claim) or "
    "dead (sent to the dead-letter stream: invalid, or failed max_deliveries times)",
    ["tenant", "outcome", "stream"],
)
CLAIMED = Counter(
    "recmesh_projector_claimed_total",
    "Pending entries taken over from a consumer that held them too long",
    ["tenant", "stream"],
)
FORGOTTEN = Counter(
    "recmesh_projector_consumers_deleted_total",
    "Consumers of gone replicas deleted from the group (no pending entries, long idle)",
    ["tenant", "stream"],
)
UNKNOWN_ITEMS = Counter(
    "recmesh_projector_unknown_items_total",
    "Applied events whose item has no feature row for the tenant (they count in the user's "
    "outcomes and the item's counters, in no category share)",
    ["tenant", "stream"],
)
LAG_EVENTS = Gauge(
    "recmesh_projector_lag_events",
    "Log entries the group has not read yet",
    ["tenant", "stream"],
)
LAG_SECONDS = Gauge(
    "recmesh_projector_lag_seconds",
    "Age of the oldest log entry the group has not read yet (0 when none)",
    ["tenant", "stream"],
)

LAG_COUNT_CAP = 100_000
"""Most unread entries counted one by one when Redis cannot say the lag itself."""

READ_CONCURRENCY = 16
"""Most ``XREADGROUP`` calls in flight at once (a cluster: one per slot of the tenants)."""

MAX_BLOCKING_READS = 16
"""Most slots whose reads block (``block_ms``); past that, a round polls every slot and
waits ``block_ms`` when none had an entry, so many tenants do not hold many connections."""


@dataclass(frozen=True)
class Lag:
    """How far the group is behind one tenant's log."""

    events: int
    seconds: float


class StreamProjector:
    """Projects the logs of ``tenants`` as consumer ``consumer`` of ``group`` (see the
    module docstring) from the stream ``stream`` names for each tenant (the log, or the
    catalog stream; ``stream_name`` labels the metrics). ``clock`` gives wall time in
    seconds (the log's positions are
    milliseconds of wall time)."""

    def __init__(
        self,
        client: AsyncRedis,
        projections: Projections,
        tenants: Sequence[str],
        *,
        group: str,
        consumer: str,
        batch: int = 200,
        block_ms: int = 100,
        linger_ms: int = 0,
        claim_idle_s: float = 30.0,
        max_deliveries: int = 5,
        consumer_idle_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        stream: Callable[[str], str] = keys.events,
        stream_name: str = "events",
    ) -> None:
        self._redis = client
        self._stream = stream
        self.stream_name = stream_name
        """The ``stream`` label of the metrics: which stream of each tenant this reads."""
        self._projections = projections
        self.tenants = list(tenants)
        self.group = group
        self.consumer = consumer
        self._batch = batch
        self._block_ms = block_ms
        self._linger_s = linger_ms / 1000
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._max_deliveries = max_deliveries
        self._consumer_idle_ms = int(consumer_idle_s * 1000)
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._own_backlog = True
        self.last_read = 0.0
        """When a read round last succeeded (``clock`` time; 0 before the first)."""

    async def prepare(self) -> None:
        """Create each tenant's group at the start of its stream, if it has none yet."""
        for tenant in self.tenants:
            try:
                await self._redis.xgroup_create(
                    self._stream(tenant), self.group, "0", mkstream=True
                )
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read_once(self) -> int:
        """Read, apply and acknowledge one round; returns how many entries. Until it has
        none left, a round reads this consumer's own pending entries (``XREADGROUP ... 0``:
        what this name had read and not acknowledged when its last process died) before
        any new one, so a restart applies the log in order. A round of new entries that
        read fewer than a full batch waits ``linger_ms`` before returning, so the next one
        gathers what arrived meanwhile: fewer, larger rounds (one wake-up and one script
        call each) for entries that arrive a few at a time, at the price of projections up
        to ``linger_ms`` later."""
        if self._own_backlog:
            handled = await self._read("0", None)
            if handled:
                return handled
            self._own_backlog = False  # every stream's own pending list is empty now
        handled = await self._read(">", self._block_ms)
        if 0 < handled < self._batch and self._linger_s:
            await asyncio.sleep(self._linger_s)
        return handled

    async def _read(self, start: str, block_ms: int | None) -> int:
        """One ``XREADGROUP`` per hash slot of the tenants' streams: one for every tenant on
        a single server; on a cluster, where each tenant's log has its own slot and one
        command cannot name keys of several, one per slot, side by side (at most
        :data:`READ_CONCURRENCY` at once). Up to :data:`MAX_BLOCKING_READS` slots each read
        blocks; with more, every read is a poll and an empty round waits ``block_ms``."""
        groups = slot_groups(self._redis, [self._stream(t) for t in self.tenants])
        blocking = block_ms if len(groups) <= MAX_BLOCKING_READS else None
        gate = asyncio.Semaphore(READ_CONCURRENCY)

        async def read(streams: list[str]) -> list[tuple[bytes, list[Entry]]]:
            async with gate:
                reply = await self._redis.xreadgroup(
                    self.group,
                    self.consumer,
                    dict.fromkeys(streams, start),
                    count=self._batch,
                    block=blocking,
                )
            return cast(list[tuple[bytes, list[Entry]]], reply or [])

        # Every read's entries are handled, even when another read failed: they were
        # delivered to this consumer and would otherwise wait for a claim.
        replies = await asyncio.gather(*(read(g) for g in groups), return_exceptions=True)
        failures = [r for r in replies if isinstance(r, BaseException)]
        if not failures:
            self.last_read = self._clock()
        handled = 0
        by_stream = {self._stream(t): t for t in self.tenants}
        for reply in replies:
            if isinstance(reply, BaseException):
                continue
            for stream, entries in reply:
                # A pending entry deleted from the stream since comes back as (id, None).
                gone = [as_text(p) for p, fields in entries if fields is None]
                if gone:
                    await self._redis.xack(stream, self.group, *gone)
                live = [entry for entry in entries if entry[1] is not None]
                handled += len(gone)
                if live:
                    handled += await self._handle(by_stream[stream.decode()], live)
        for failure in failures:
            if not (isinstance(failure, redis.ResponseError) and "NOGROUP" in str(failure)):
                raise failure
        if failures:
            await self.prepare()  # Redis lost its data (a restart without persistence)
            return handled
        if not handled and block_ms and blocking is None:
            await asyncio.sleep(block_ms / 1000)
        return handled

    async def claim_once(self) -> int:
        """Take over and apply every entry pending longer than ``claim_idle_s``; returns
        how many."""
        handled = 0
        for tenant in self.tenants:
            try:
                handled += await self._claim_tenant(tenant)
            except redis.ResponseError:  # one tenant's failure does not stop the others'
                log.exception("claiming pending entries failed", extra={"tenant": tenant})
        return handled

    async def _claim_tenant(self, tenant: str) -> int:
        await self._give_up(tenant)
        await self._forget_consumers(tenant)
        handled = 0
        start = "0-0"
        while True:
            try:
                reply = await self._redis.xautoclaim(
                    self._stream(tenant),
                    self.group,
                    self.consumer,
                    self._claim_idle_ms,
                    start_id=start,
                    count=self._batch,
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return handled
            start = as_text(reply[0])
            # Redis 6.2 answers a deleted pending entry as (id, None): nothing to apply.
            entries = [e for e in cast(list[Entry], reply[1]) if e[1] is not None]
            gone = [as_text(p) for p in (reply[2] if len(reply) > 2 else [])]
            if gone:  # trimmed from the stream while pending: nothing left to apply
                await self._redis.xack(self._stream(tenant), self.group, *gone)
            if entries:
                CLAIMED.labels(tenant, self.stream_name).inc(len(entries))
                handled += await self._handle(tenant, entries)
            if start == "0-0":
                return handled

    async def _handle(self, tenant: str, entries: list[Entry]) -> int:
        """Apply ``entries``, dead-letter the invalid ones and acknowledge all but those the
        script could not apply (left pending: claimed again later, up to the delivery
        cap). A script error leaves the whole batch pending."""
        events, dead = decoded(entries)
        applied = await self._projections.apply(tenant, [event for _, event in events])
        failed = {events[i][0] for i in applied.failed}
        for position in sorted(failed):
            log.warning(
                "an event's keys hold values of another type; it stays pending",
                extra={"fields": {"tenant": tenant, "position": position}},
            )
        done = [as_text(position) for position, _ in entries if as_text(position) not in failed]
        await self._dead_letter(tenant, dead, done)
        EVENTS.labels(tenant, "applied", self.stream_name).inc(applied.applied)
        EVENTS.labels(tenant, "duplicate", self.stream_name).inc(
            len(events) - len(failed) - applied.applied
        )
        EVENTS.labels(tenant, "failed", self.stream_name).inc(len(failed))
        UNKNOWN_ITEMS.labels(tenant, self.stream_name).inc(applied.unknown_items)
        return len(entries)

    async def _dead_letter(self, tenant: str, dead: Sequence[Dead], acked: Sequence[str]) -> None:
        """Write ``dead`` to the tenant's dead-letter stream and acknowledge ``acked`` (the
        dead ones among them), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for letter in dead:
                pipe.xadd(
                    keys.dead_letters(tenant),
                    {"position": letter.position, "reason": letter.reason, "e": letter.payload},
                )
            if acked:
                pipe.xack(self._stream(tenant), self.group, *acked)
            await pipe.execute()
        for letter in dead:
            log.warning(
                "event sent to the dead-letter stream",
                extra={
                    "fields": {
                        "tenant": tenant,
                        "position": letter.position,
                        "reason": letter.reason,
                    }
                },
            )
        EVENTS.labels(tenant, "dead", self.stream_name).inc(len(dead))

    async def _give_up(self, tenant: str) -> None:
        """Dead-letter the entries pending longer than ``claim_idle_s`` that were delivered
        ``max_deliveries`` times already: each delivery failed to apply them."""
        stream = self._stream(tenant)
        pending = await self._redis.xpending_range(
            stream, self.group, min="-", max="+", count=self._batch, idle=self._claim_idle_ms
        )
        over = [
            as_text(cast(bytes, p["message_id"]))
            for p in pending
            if int(p["times_delivered"]) >= self._max_deliveries
        ]
        if not over:
            return
        letters: list[Dead] = []
        for position in over:
            found = cast(list[Entry], await self._redis.xrange(stream, position, position))
            payload = found[0][1].get(b"e", b"") if found else b""
            letters.append(
                Dead(position, f"not applied after {self._max_deliveries} deliveries", payload)
            )
        await self._dead_letter(tenant, letters, over)

    async def _forget_consumers(self, tenant: str) -> None:
        """Delete the group's consumers (other than this one) that hold no pending entries
        and were idle longer than ``consumer_idle_s``: replicas gone for good (a
        scaled-down replica set, a renamed host)."""
        stream = self._stream(tenant)
        consumers: list[dict[str, Any]] = await self._redis.xinfo_consumers(stream, self.group)
        for consumer in consumers:
            name = as_text(consumer["name"])
            if (
                name != self.consumer
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > self._consumer_idle_ms
            ):
                await self._redis.xgroup_delconsumer(stream, self.group, name)
                FORGOTTEN.labels(tenant, self.stream_name).inc()

    async def lag(self, tenant: str) -> Lag:
        """How far the group is behind ``tenant``'s log now."""
        stream = self._stream(tenant)
        groups: list[dict[str, Any]] = await self._redis.xinfo_groups(stream)
        info = next((g for g in groups if as_text(g["name"]) == self.group), None)
        if info is None:
            return Lag(0, 0.0)
        behind = info.get("lag")
        last = as_text(info["last-delivered-id"])
        oldest = cast(list[Entry], await self._redis.xrange(stream, min=f"({last}", count=1))
        if behind is None:  # Redis could not count (entries were deleted): count them here
            unread = await self._redis.xrange(stream, min=f"({last}", count=LAG_COUNT_CAP)
            behind = len(cast(list[Entry], unread))
        if not oldest:
            return Lag(int(behind), 0.0)
        appended_ms = int(as_text(oldest[0][0]).split("-")[0])
        return Lag(int(behind), max(0.0, self._clock() - appended_ms / 1000))

    async def _run(self, step: Callable[[], Any], pause_s: float, what: str) -> None:
        """Run ``step`` forever, ``pause_s`` apart; a failure (Redis down) is logged and
        retried after a pause, never ends the loop."""
        while True:
            try:
                await step()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("%s failed, retrying: %s", what, exc)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("%s failed, retrying", what)
                await asyncio.sleep(0.5)
            if pause_s:
                await asyncio.sleep(pause_s)

    async def _publish_lag(self) -> None:
        for tenant in self.tenants:
            lag = await self.lag(tenant)
            LAG_EVENTS.labels(tenant, self.stream_name).set(lag.events)
            LAG_SECONDS.labels(tenant, self.stream_name).set(lag.seconds)

    async def start(self) -> None:
        """Create the groups, then read, claim and publish the lag in the background."""
        await self._projections.prepare()
        await self.prepare()
        self._tasks = [
            asyncio.create_task(self._run(self.read_once, 0.0, "read")),
            asyncio.create_task(self._run(self.claim_once, self._claim_idle_ms / 2000, "claim")),
            asyncio.create_task(self._run(self._publish_lag, 1.0, "lag")),
        ]

    def progressing(self, within_s: float) -> bool:
        """Whether the loops are alive and a read round succeeded in the last ``within_s``
        seconds (an idle read returns after ``block_ms``, so a healthy projector reads
        several times a second)."""
        alive = bool(self._tasks) and not any(task.done() for task in self._tasks)
        return alive and self._clock() - self.last_read <= within_s

    async def stop(self) -> None:
        """Stop reading; what was read and not acknowledged stays pending for a claim."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
