"""Erasing one user from a tenant's data: events, projections, features; the item
aggregates their events fed are recomputed; an audit record says who did it, when, and how
much went.

:meth:`Eraser.erase` removes, for one user of one tenant, in this order:

1. **Events.** Every log entry (``keys.events``) whose ``Event`` names the user, found by a
   scan of the whole log (which also finds events appended before the user index existed)
   and by the user index (``keys.user_events``, which also finds those appended while the
   scan ran); removed with ``XDEL``, and their positions from the request indexes
   (``keys.request_events``); then the user index itself. An entry that is not an ``Event``
   cannot name anyone and stays.
2. **Projections and features**: the user's recent outcomes and category shares (live,
   and in any rebuild namespace), the feature row and the materialised history.
3. **Dead letters** (``keys.dead_letters``) whose raw bytes decode to an ``Event`` of the
   user; those that do not decode stay.
4. **The snapshot** (``keys.snapshot``), if any: the user's outcomes and shares are
   dropped, and the item counters lose what the user's events still in the log at or
   before the snapshot's position added (each ``exp((t - at) / tau)``; a kind left with
   nothing is dropped; its ``at`` stays, so the value is the same decayed count as of that
   time). Edited under ``WATCH``: a snapshot stored meanwhile is edited in its turn, never
   overwritten by an older one.
5. **Item aggregates.** The counters and trending scores of every item the removed events
   touched (and of the items of the user's outcomes, live or in the snapshot) are written
   again: the snapshot's counters plus a replay (:class:`core.replay.Replay`) of the
   remaining log after it, in the projector's stored forms (``%.17g``, integer ms; the
   trending score of the click counter, or no place in the set when no click remains).
6. **Audit.** One record appended to ``keys.audit``: who asked (``requested_by``) and from
   where (the caller's peer), when, the request id, the subject as ``sha256:<hex of the
   user id>`` (the audit log does not keep the erased id itself) and the counts. It is
   written last, so an erasure that failed midway (Redis gone) has no record. Erasing
   again removes whatever of the user is left and is audited again (a user with nothing
   stored is a no-op that is still audited); but the counters of items only the events
   removed by the failed run had touched are not recomputed by the second (it cannot
   know them any more): ``recmesh projections verify`` names them.

What stays, by design:

* Contributions of events already trimmed from the log into the snapshot stay in the item
  aggregates: they are per-item counts, no longer personal data, and the events that would
  say how much to take away are gone.
* Event-id claims (``keys.event_claim``) and the projector's applied marks
  (``keys.applied``) stay until they expire (the dedupe window, the applied TTL): they hold
  an event id, not the user, and the claim is what keeps a redelivered copy of an erased
  event (the gateway's outbox retrying) out of the log.
* Events of the user posted after the erasure (or still waiting in a gateway's outbox) are
  new data; the feature row and history come back if an artifact set that has the user is
  materialised again.

Races, since a deployment erases with the projector running:

* **Counters.** The live counters hold what the projector applied, which is not the whole
  log while it lags. The rewrite counts an entry when the projector's group
  (``group``) acknowledged it, or holds it pending and its applied mark exists; the
  projector applies the others later, on top of the rewritten value, as it would have.
  The read and the write run under ``WATCH`` of the items' counter keys: a batch the
  projector applies to one of them in between fails the write, which starts again (after
  folding in what was acknowledged meanwhile), so no applied event is lost and none is
  counted twice. Edges: a log the group does not exist for (nothing projected yet) gets the
  snapshot's counters; an entry the projector gave up on after its delivery cap
  (acknowledged, never applied) counts as applied; a snapshot taken ahead of the group
  (``recmesh projections snapshot`` while the projector lags) holds entries the projector
  has not applied yet, which it will add again. After ``race_s`` of failed writes the last
  one is made without ``WATCH`` (and logged).
* **A stalled projector batch.** Entries a replica read before the ``XDEL`` and applies
  after the rewrite bring back the user's outcome and the items' counts of those events.
  The user's projection keys are deleted again at the end, which covers a batch applied
  before that; erasing again removes the rest (the outcomes it finds name the items to
  recompute).
* **A snapshot taken meanwhile** (``recmesh projections snapshot``, retention) that read the
  old snapshot before the edit and stores its successor after it carries the user's
  outcomes and shares over; erasing again removes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from recmesh.events.v1 import events_pb2

from core import keys
from core.events import validate_event
from core.logread import Entry, as_text, iter_entries, position_order
from core.replay import (
    COUNTED,
    TRENDING_KIND,
    Projected,
    Replay,
    appended_ms,
    counter_fields,
    decode_event,
    tau_ms,
    trending_score,
)
from core.validation import check_user_id
from mesh.errors import InvalidArgument
from mesh.redis import AsyncRedis

log = logging.getLogger(__name__)


PAGE = 1000
"""Entries read (and ids deleted) per call."""

EMPTIED = 1e-9
"""A snapshot counter that falls to this fraction of its value or less when the user's
contributions are taken away held nothing else (what is left is rounding)."""


MAX_REQUESTED_BY_BYTES = 256
"""Longest ``requested_by`` an audit record keeps."""


def check_request(user_id: str, requested_by: str) -> None:
    """Check what an erasure is asked with.

    Raises:
        InvalidArgument: ``user_id`` empty or longer than a user id can be, or
            ``requested_by`` empty or longer than :data:`MAX_REQUESTED_BY_BYTES`.
    """
    check_user_id(user_id)
    if not requested_by:
        raise InvalidArgument(
            "requested_by is required: who erases is part of the audit record",
            field="requested_by",
        )
    if len(requested_by.encode()) > MAX_REQUESTED_BY_BYTES:
        raise InvalidArgument(
            f"requested_by is longer than {MAX_REQUESTED_BY_BYTES} bytes", field="requested_by"
        )


def subject(user_id: str) -> str:
    """How the audit record names an erased user: ``sha256:<hex of the UTF-8 id>``."""
    return "sha256:" + hashlib.sha256(user_id.encode()).hexdigest()


@dataclass(frozen=True)
class Erased:
    """What :meth:`Eraser.erase` removed (the counts of the audit record)."""

    subject: str
    events: int
    """Log entries of the user removed."""
    dead_letters: int
    projections: int
    """Projection keys of the user removed (outcomes, category shares; live and rebuilds')."""
    snapshot_entries: int
    """The user's parts removed from the snapshot (outcomes, category shares)."""
    feature_keys: int
    """Feature keys of the user removed (user row, materialised history)."""
    items_recomputed: int
    audit_position: str
    """Position of the audit record in ``keys.audit``."""


@dataclass
class _Found:
    """The user's log entries: position -> event."""

    events: dict[str, events_pb2.Event] = field(default_factory=dict)


class Eraser:
    """Erases users of a tenant (see the module docstring).

    Args:
        client: asyncio Redis client (bytes responses).
        half_life_s: the projector's half-life of the item counters.
        group: the projector's consumer group.
        race_s: how long the counters' rewrite is retried while the projector keeps
            changing them, before it is written without ``WATCH``.
    """

    def __init__(
        self, client: AsyncRedis, half_life_s: float, group: str, race_s: float = 10.0
    ) -> None:
        self._redis = client
        self._half_life_s = half_life_s
        self._tau = tau_ms(half_life_s)
        self._group = group
        self._race_s = race_s

    async def erase(
        self, tenant: str, user_id: str, requested_by: str, peer: str = "", request_id: str = ""
    ) -> Erased:
        """Erase ``user_id`` from ``tenant`` and audit it as asked by ``requested_by`` (from
        ``peer``, in request ``request_id``); returns the counts, also in the record.

        Raises:
            InvalidArgument: see :func:`check_request`.
        """
        check_request(user_id, requested_by)
        found = await self._find(tenant, user_id)
        outcome_items = await self._outcome_items(tenant, user_id)
        events = await self._delete_events(tenant, user_id, found)
        projections = await self._delete_projections(tenant, user_id, rebuilds=True)
        feature_keys = int(
            await self._redis.delete(keys.user_row(tenant, user_id), keys.history(tenant, user_id))
        )
        dead_letters = await self._delete_dead_letters(tenant, user_id)
        snapshot_entries, base, snapshot_items = await self._edit_snapshot(tenant, user_id, found)
        items = {e.item_id for e in found.events.values()} | outcome_items | snapshot_items
        await self._recompute(tenant, items, base)
        # A projector batch applied while the above ran may have written the user's keys again.
        projections += await self._delete_projections(tenant, user_id, rebuilds=False)
        erased = Erased(
            subject=subject(user_id),
            events=events,
            dead_letters=dead_letters,
            projections=projections,
            snapshot_entries=snapshot_entries,
            feature_keys=feature_keys,
            items_recomputed=len(items),
            audit_position="",
        )
        position = await self._audit(tenant, erased, requested_by, peer, request_id)
        erased = dataclasses.replace(erased, audit_position=position)
        log.info(
            "erased a user",
            extra={
                "fields": {
                    "tenant": tenant,
                    **dataclasses.asdict(erased),
                    "requested_by": requested_by,
                }
            },
        )
        return erased

    # -- 1. the events ---------------------------------------------------------------

    async def _find(self, tenant: str, user_id: str) -> _Found:
        """The user's log entries: by a scan of the whole log, then by the user index (for
        what was appended while the scan ran)."""
        found = _Found()
        async for entries in iter_entries(self._redis, keys.events(tenant), page=PAGE):
            for raw, fields in entries:
                if (event := _event_of(fields.get(b"e"), user_id)) is not None:
                    found.events[raw.decode()] = event
        indexed = cast(
            list[bytes], await self._redis.zrange(keys.user_events(tenant, user_id), 0, -1)
        )
        missing = [p.decode() for p in indexed if p.decode() not in found.events]
        if missing:
            async with self._redis.pipeline(transaction=False) as pipe:
                for position in missing:
                    pipe.xrange(keys.events(tenant), min=position, max=position)
                replies = cast(list[list[Entry]], await pipe.execute())
            for entries in replies:
                for raw, fields in entries:
                    if (event := _event_of(fields.get(b"e"), user_id)) is not None:
                        found.events[raw.decode()] = event
        return found

    async def _outcome_items(self, tenant: str, user_id: str) -> set[int]:
        """The items of the user's live outcomes (their counters are recomputed too: an
        outcome applied after an earlier erasure names its item)."""
        items = cast(list[bytes], await self._redis.lrange(keys.outcomes(tenant, user_id), 0, -1))
        return {int(item) for item in items}

    async def _delete_events(self, tenant: str, user_id: str, found: _Found) -> int:
        """``XDEL`` the user's entries, drop their positions from the request indexes and
        from the user index (only those: an event the user appended since the search stays
        indexed with its entry); returns how many entries went."""
        stream = keys.events(tenant)
        positions = list(found.events)
        removed = 0
        for start in range(0, len(positions), PAGE):
            removed += int(await self._redis.xdel(stream, *positions[start : start + PAGE]))
        async with self._redis.pipeline(transaction=False) as pipe:
            for position, event in found.events.items():
                if event.request_id:
                    pipe.lrem(keys.request_events(tenant, event.request_id), 0, position)
            for start in range(0, len(positions), PAGE):
                pipe.zrem(keys.user_events(tenant, user_id), *positions[start : start + PAGE])
            await pipe.execute()
        return removed

    # -- 2. projections and features -------------------------------------------------

    async def _delete_projections(self, tenant: str, user_id: str, rebuilds: bool) -> int:
        """Delete the user's outcomes and category shares, live and (``rebuilds``) in every
        rebuild namespace, found by one ``SCAN``; returns how many keys went."""
        live = [keys.outcomes(tenant, user_id), keys.category_shares(tenant, user_id)]
        names = list(live)
        if rebuilds:
            base = keys.projection_prefix(tenant, "")
            within = f"{base}ns:"
            suffixes = [":" + name[len(base) :] for name in live]  # ":o:<user>", ":uc:<user>"
            pattern = f"{within}*:{_glob_escape(user_id)}"
            async for raw in self._redis.scan_iter(match=pattern, count=1000):
                name = cast(bytes, raw).decode()
                for suffix in suffixes:
                    # <prefix>ns:<namespace>:<kind>:<user>: the namespace is what lies between,
                    # checked by naming the key again from it.
                    namespace = name[len(within) : -len(suffix)] if name.endswith(suffix) else ""
                    if namespace and name in (
                        keys.outcomes(tenant, user_id, namespace),
                        keys.category_shares(tenant, user_id, namespace),
                    ):
                        names.append(name)
                        break
        return int(await self._redis.delete(*names))

    # -- 3. dead letters -------------------------------------------------------------

    async def _delete_dead_letters(self, tenant: str, user_id: str) -> int:
        """``XDEL`` the dead letters whose raw event decodes to one of the user's."""
        stream = keys.dead_letters(tenant)
        doomed: list[str] = []
        async for entries in iter_entries(self._redis, stream, page=PAGE):
            doomed += [
                raw.decode()
                for raw, fields in entries
                if _event_of(fields.get(b"e"), user_id) is not None
            ]
        removed = 0
        for start in range(0, len(doomed), PAGE):
            removed += int(await self._redis.xdel(stream, *doomed[start : start + PAGE]))
        return removed

    # -- 4. the snapshot -------------------------------------------------------------

    async def _edit_snapshot(
        self, tenant: str, user_id: str, found: _Found
    ) -> tuple[int, Projected | None, set[int]]:
        """Drop the user from the snapshot (see the module docstring); returns how many of
        its parts went, the snapshot as edited (None when there is none) and the items
        whose counters it changed or whose outcomes it held."""
        key = keys.snapshot(tenant)
        while True:
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    state = cast(bytes | None, await pipe.hget(key, "state"))
                    if state is None:
                        return 0, None, set()
                    projected = Projected.from_bytes(state)
                    items = set(projected.outcomes.get(user_id, []))
                    parts = int(projected.outcomes.pop(user_id, None) is not None)
                    parts += int(projected.shares.pop(user_id, None) is not None)
                    items |= self._subtract(projected, found)
                    if parts or items:
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.hset(key, "state", projected.to_bytes())
                        await pipe.execute()
                    return parts, projected, items
            except redis.WatchError:
                continue  # a new snapshot was stored meanwhile: edit that one

    def _subtract(self, projected: Projected, found: _Found) -> set[int]:
        """Take the contributions of the user's events at or before the snapshot's
        position out of its counters (applied as :class:`~core.replay.Replay` applies
        them: valid as of their append time, once per id, time capped at the append time);
        returns the items changed."""
        if not projected.position:
            return set()
        bound = position_order(projected.position)
        changed: set[int] = set()
        seen: set[str] = set()
        for position, event in sorted(found.events.items(), key=lambda pe: position_order(pe[0])):
            if (
                position_order(position) > bound
                or event.type not in COUNTED
                or event.event_id in seen
            ):
                continue
            appended = appended_ms(position)
            try:
                validate_event(event, 0, appended)
            except InvalidArgument:
                continue
            seen.add(event.event_id)
            kinds = projected.counters.get(event.item_id, {})
            stored = kinds.get(event.type)
            ts = min(event.ts_ms, appended)
            if stored is None or ts > stored[1]:
                continue  # not in the snapshot's counters: nothing to take away
            value, at = stored
            left = value - math.exp((ts - at) / self._tau)
            if left <= value * EMPTIED:
                del kinds[event.type]
            else:
                kinds[event.type] = (left, at)
            if not kinds:
                projected.counters.pop(event.item_id, None)
            changed.add(event.item_id)
        return changed

    # -- 5. the item aggregates ------------------------------------------------------

    async def _recompute(self, tenant: str, items: set[int], base: Projected | None) -> None:
        """Write the counters and trending scores of ``items`` again from ``base`` (the
        snapshot) and the entries after it that the projector applied (see the module
        docstring: the race)."""
        if not items:
            return
        stream = keys.events(tenant)
        start = Projected(
            counters={
                item: dict(base.counters[item])
                for item in items
                if base is not None and item in base.counters
            },
            position=base.position if base is not None else "",
        )
        # Only the items' events are replayed (ids are unique among them as the log's
        # dedupe keeps them); history cap and categories do not matter for counters.
        applied = Replay(self._half_life_s, 1, {}, start)
        folded = start.position
        counter_keys = [keys.item_counters(tenant, item) for item in sorted(items)]
        give_up = time.monotonic() + self._race_s
        while True:
            guarded = time.monotonic() < give_up
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    if guarded:
                        await pipe.watch(*counter_keys)
                    group = await self._group_state(stream)
                    tail: list[tuple[str, events_pb2.Event]] = []
                    if group is not None:
                        delivered, pending = group
                        oldest_pending = min(pending, key=position_order) if pending else None
                        async for entries in iter_entries(
                            self._redis, stream, folded, delivered, PAGE
                        ):
                            for raw, fields in entries:
                                position = raw.decode()
                                event = decode_event(fields.get(b"e"))
                                mine = event is not None and event.item_id in items
                                if oldest_pending is None or position_order(
                                    position
                                ) < position_order(oldest_pending):
                                    # Acknowledged: applied, and stays so. Fold it in for good.
                                    if mine:
                                        applied.apply(position, event)
                                    folded = position
                                elif event is not None and mine:
                                    tail.append((position, event))
                        tail = await self._applied_only(tenant, tail, pending)
                    now = Replay(
                        self._half_life_s,
                        1,
                        {},
                        Projected(counters={i: dict(k) for i, k in applied.state.counters.items()}),
                    ).apply_all(tail)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._write(pipe, tenant, items, now)
                    await pipe.execute()
                    if not guarded:
                        log.warning(
                            "the projector kept changing the erased user's items; their "
                            "counters were rewritten without WATCH",
                            extra={"fields": {"tenant": tenant, "items": len(items)}},
                        )
                    return
            except redis.WatchError:
                await asyncio.sleep(0.005)

    async def _group_state(self, stream: str) -> tuple[str, set[str]] | None:
        """The projector group's last delivered position and its pending positions; None
        when the log has no such group (or no log)."""
        try:
            groups: list[dict[str, Any]] = await self._redis.xinfo_groups(stream)
        except redis.ResponseError:
            return None  # no stream
        info = next((g for g in groups if as_text(g["name"]) == self._group), None)
        if info is None:
            return None
        pending: set[str] = set()
        if int(info["pending"]):
            rows = cast(
                list[dict[str, Any]],
                await self._redis.xpending_range(
                    stream, self._group, min="-", max="+", count=int(info["pending"])
                ),
            )
            pending = {as_text(row["message_id"]) for row in rows}
        return as_text(info["last-delivered-id"]), pending

    async def _applied_only(
        self,
        tenant: str,
        tail: Sequence[tuple[str, events_pb2.Event]],
        pending: set[str],
    ) -> list[tuple[str, events_pb2.Event]]:
        """Of delivered ``tail`` entries, those the projector applied: acknowledged, or
        pending with their applied mark set."""
        asked = [(p, e) for p, e in tail if p in pending]
        marked: set[str] = set()
        if asked:
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, event in asked:
                    pipe.exists(keys.applied(tenant, event.event_id))
                replies = cast(list[int], await pipe.execute())
            marked = {p for (p, _), hit in zip(asked, replies, strict=True) if hit}
        return [(p, e) for p, e in tail if p not in pending or p in marked]

    def _write(self, pipe: Any, tenant: str, items: Iterable[int], state: Projected) -> None:
        """Queue the counters and trending places of ``items`` as ``state`` has them, in
        the forms the projector's Lua writes."""
        trending = keys.trending(tenant)
        for item in sorted(items):
            key = keys.item_counters(tenant, item)
            kinds = state.counters.get(item, {})
            pipe.delete(key)
            if kinds:
                pipe.hset(key, items=counter_fields(kinds))
            click = kinds.get(TRENDING_KIND)
            if click is not None:
                pipe.zadd(trending, {str(item): trending_score(click[0], click[1], self._tau)})
            else:
                pipe.zrem(trending, str(item))

    # -- 6. audit --------------------------------------------------------------------

    async def _audit(
        self, tenant: str, erased: Erased, requested_by: str, peer: str, request_id: str
    ) -> str:
        record: dict[str, str | int] = {
            "action": "erase_user",
            "subject": erased.subject,
            "requested_by": requested_by,
            "peer": peer,
            "request_id": request_id,
            "at_ms": int(time.time() * 1000),
            "events": erased.events,
            "dead_letters": erased.dead_letters,
            "projections": erased.projections,
            "snapshot_entries": erased.snapshot_entries,
            "feature_keys": erased.feature_keys,
            "items_recomputed": erased.items_recomputed,
        }
        position = await self._redis.xadd(keys.audit(tenant), cast(Any, record))
        return as_text(cast(bytes, position))


def _event_of(payload: bytes | None, user_id: str) -> events_pb2.Event | None:
    """The ``Event`` of raw bytes when it is one of ``user_id``'s, else None. A serialized
    event holds its user id as plain bytes, so most entries are ruled out without
    decoding them."""
    if payload is None or user_id.encode() not in payload:
        return None
    event = decode_event(payload)
    return event if event is not None and event.user_id == user_id else None


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a ``SCAN MATCH`` pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
