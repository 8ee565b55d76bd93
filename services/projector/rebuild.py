"""Writing projections from the log: a rebuild into a fresh namespace, snapshots, and
retention (trimming the log behind a snapshot, so a rebuild still works).

* :func:`rebuild` drops the namespace, writes the tenant's snapshot into it (when it has
  one) and replays the log after the snapshot through the projector's own Lua
  (:class:`~services.projector.projections.Projections` in that namespace): the stream's
  code, not a second implementation. ``recmesh projections rebuild --verify`` then
  compares the namespace with the live projections.
* :func:`trim` stores a snapshot at a bound and trims the log up to it (``XTRIM MINID``):
  the projections as of that position, computed by the batch rules (the snapshot before
  plus the entries between), never read from the live keys, so a snapshot is exactly what
  the log says. The bound never passes an entry the projector's group has not read, or
  has read and not acknowledged: trimming cannot lose an event from the live projections.
  Snapshots are taken only there, so a snapshot's position is always where the log was
  trimmed to: the log holds everything after it, and nothing before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from core import keys
from core.logread import Entry, as_text, position_order
from core.replay import Projected, counter_fields, tau_ms
from mesh.redis import AsyncRedis
from services.projector import batch
from services.projector.projections import Projections, decoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rebuilt:
    """What :func:`rebuild` did."""

    namespace: str
    snapshot_position: str
    """Where the snapshot it started from ends ("" when it replayed the whole log)."""
    replayed: int
    """Log entries replayed after the snapshot."""
    dead: int
    """Of those, entries that are not valid events (the live projector's dead letters)."""
    seconds: float


async def drop_namespace(client: AsyncRedis, tenant: str, namespace: str) -> int:
    """Delete every key of ``tenant``'s projection namespace ``namespace`` (not the live
    one: refused for ""); returns how many."""
    if not namespace:
        raise ValueError("the live projections are not a namespace to drop")
    names = [
        key
        async for key in client.scan_iter(
            match=f"{keys.projection_prefix(tenant, namespace)}*", count=1000
        )
    ]
    for start in range(0, len(names), 1000):
        await client.unlink(*names[start : start + 1000])
    return len(names)


async def write(
    client: AsyncRedis, tenant: str, projected: Projected, namespace: str, half_life_s: float
) -> None:
    """Write ``projected`` into ``namespace`` in the projector's stored forms (numbers as
    the Lua writes them, so a read gives back the same doubles)."""
    tau = tau_ms(half_life_s)
    async with client.pipeline(transaction=False) as pipe:
        for user, items in projected.outcomes.items():
            if items:
                pipe.rpush(keys.outcomes(tenant, user, namespace), *items)
        for user, shares in projected.shares.items():
            if shares:
                pipe.hset(
                    keys.category_shares(tenant, user, namespace),
                    items=[str(x) for pair in shares.items() for x in pair],
                )
        for item, kinds in projected.counters.items():
            pipe.hset(keys.item_counters(tenant, item, namespace), items=counter_fields(kinds))
        trending = projected.trending(tau)
        if trending:
            pipe.zadd(keys.trending(tenant, namespace), {str(i): s for i, s in trending.items()})
        await pipe.execute()


async def rebuild(
    client: AsyncRedis,
    tenant: str,
    projections: Projections,
    half_life_s: float,
    from_snapshot: bool = True,
    page: int = 500,
) -> Rebuilt:
    """Rebuild ``tenant``'s projections into ``projections.namespace`` (see the module
    docstring): from its snapshot and the log after it, or from the whole log when
    ``from_snapshot`` is False (refused once the log was trimmed behind the snapshot,
    which the log alone no longer explains)."""
    namespace = projections.namespace
    started = time.perf_counter()
    await drop_namespace(client, tenant, namespace)
    found = await batch.read_snapshot(client, tenant)
    if not from_snapshot and found is not None and found.trimmed_to:
        raise ValueError(
            f"the log of {tenant} was trimmed up to {found.trimmed_to}: rebuild from the snapshot"
        )
    base = found.projected if found is not None and from_snapshot else None
    if base is not None:
        await write(client, tenant, base, namespace, half_life_s)
    await projections.prepare()
    replayed = dead_count = 0
    start = f"({base.position}" if base is not None and base.position else "-"
    while True:
        entries = cast(list[Entry], await client.xrange(keys.events(tenant), min=start, count=page))
        if not entries:
            break
        events, dead = decoded(entries)
        await projections.apply(tenant, [event for _, event in events])
        replayed += len(entries)
        dead_count += len(dead)
        start = f"({entries[-1][0].decode()}"
    return Rebuilt(
        namespace,
        base.position if base is not None else "",
        replayed,
        dead_count,
        time.perf_counter() - started,
    )


@dataclass(frozen=True)
class Trimmed:
    """What :func:`trim` did."""

    position: str
    """The snapshot's position: every entry up to it was trimmed ("" when none was)."""
    removed: int


async def trim(
    client: AsyncRedis,
    tenant: str,
    before_ms: int,
    group: str,
    half_life_s: float,
    history_cap: int,
) -> Trimmed:
    """Snapshot ``tenant``'s projections and trim its log of the entries appended before
    ``before_ms`` that the projector's ``group`` has read and acknowledged (see the module
    docstring). The snapshot is stored at exactly the trim point (``position`` =
    ``trimmed_to``), computed from the one before and the log between, and only if no one
    changed the stored one meanwhile (an erasure's edit): then it is computed again.

    Raises:
        RuntimeError: the snapshot kept changing under it (five tries).
    """
    stream = keys.events(tenant)
    bound = await _last_before(client, stream, f"{before_ms - 1}")
    if bound is None:
        return Trimmed("", 0)
    groups: list[dict[str, Any]] = await client.xinfo_groups(stream)
    info = next((g for g in groups if as_text(g["name"]) == group), None)
    if info is None:
        return Trimmed("", 0)  # nobody projects this log yet: trimming would lose events
    bound = min(bound, as_text(info["last-delivered-id"]), key=position_order)
    if position_order(bound) == (0, 0):
        return Trimmed("", 0)
    pending = await client.xpending(stream, group)
    if pending["pending"]:
        before_pending = await _last_before(client, stream, f"({as_text(pending['min'])}")
        if before_pending is None:
            return Trimmed("", 0)
        bound = min(bound, before_pending, key=position_order)
    for _ in range(5):
        base = await batch.read_snapshot(client, tenant)
        start = base.projected if base is not None else None
        if start is not None and position_order(start.position) >= position_order(bound):
            break  # a trim with a longer retention before: nothing newer to trim
        projected = await batch.recompute(client, tenant, half_life_s, history_cap, start, bound)
        if not projected.position:
            return Trimmed("", 0)
        # Stored only if no one (an erasure) changed the snapshot meanwhile; else again.
        if await batch.store_snapshot(client, tenant, projected, base, trimmed_to=bound):
            millis, _, seq = bound.partition("-")
            removed = int(
                await client.xtrim(stream, minid=f"{millis}-{int(seq or 0) + 1}", approximate=False)
            )
            return Trimmed(bound, removed)
    else:
        raise RuntimeError(f"the snapshot of {tenant} kept changing while it was computed")
    return Trimmed("", 0)


async def _last_before(client: AsyncRedis, stream: str, bound: str) -> str | None:
    try:
        found = cast(list[Entry], await client.xrevrange(stream, max=bound, min="-", count=1))
    except redis.ResponseError:
        return None
    return found[0][0].decode() if found else None


class Retention:
    """Trims, every ``every_s`` seconds, the log of each tenant with a retention (tenant ->
    days) behind a fresh snapshot (:func:`trim`). Of several projector replicas, the one
    that takes the tenant's lock (``SET NX EX``) trims it; the others skip the round."""

    def __init__(
        self,
        client: AsyncRedis,
        retention_days: dict[str, float],
        *,
        group: str,
        half_life_s: float,
        history_cap: int,
        every_s: float,
    ) -> None:
        self._redis = client
        self._days = retention_days
        self._group = group
        self._half_life_s = half_life_s
        self._cap = history_cap
        self._every_s = every_s
        self._task: asyncio.Task[None] | None = None

    async def once(self) -> dict[str, Trimmed]:
        """One round over the tenants; returns what each trimmed (skipped ones left out)."""
        done: dict[str, Trimmed] = {}
        now_ms = int(time.time() * 1000)
        for tenant, days in self._days.items():
            lock = keys.retention_lock(tenant)
            if not await self._redis.set(lock, "1", nx=True, ex=max(1, int(self._every_s))):
                continue
            done[tenant] = await trim(
                self._redis,
                tenant,
                now_ms - int(days * 86_400_000),
                self._group,
                self._half_life_s,
                self._cap,
            )
            if done[tenant].removed:
                log.info(
                    "trimmed the event log behind a snapshot",
                    extra={"fields": {"tenant": tenant, "removed": done[tenant].removed}},
                )
        return done

    async def _loop(self) -> None:
        while True:
            try:
                await self.once()
            except Exception:
                log.exception("retention round failed; the next one retries")
            await asyncio.sleep(self._every_s)

    async def start(self) -> None:
        if self._days:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
