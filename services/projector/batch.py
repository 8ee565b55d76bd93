"""The projections recomputed from the log in one pass (batch), and their comparison with
the live ones the stream keeps (kappa: one set of rules, two ways of running them).

:func:`recompute` applies exactly the rules of :mod:`services.projector.projections` to a
tenant's stored events in log order: each event id once, valid events only, event times
no later than their append time. :func:`differences` compares the result with what the
projector wrote to Redis; ``recmesh projections verify`` runs both and exits non-zero on
any difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from recmesh.events.v1 import events_pb2

from core import keys
from core.events import validate_event
from mesh.errors import InvalidArgument
from services.projector.projections import COUNTED, OUTCOMES

TOLERANCE = 1e-9
"""Relative difference of two decayed counts still taken as equal (Lua and numpy round
the same sums in different orders)."""


@dataclass
class Recomputed:
    """A tenant's projections as a batch over its log computes them."""

    outcomes: dict[str, list[int]] = field(default_factory=dict)
    """User -> projected clicks and conversions, newest last (capped)."""
    counters: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)
    """Item -> kind -> (decayed count as of ``at``, ``at`` in ms)."""


def recompute(
    stored: Iterable[tuple[str, events_pb2.Event | None]], half_life_s: float, history_cap: int
) -> Recomputed:
    """The projections of ``stored`` (log position, event or None for an invalid entry),
    in log order."""
    tau_ms = half_life_s * 1000.0 / math.log(2)
    seen: set[str] = set()
    result = Recomputed()
    for position, event in stored:
        if event is None or event.event_id in seen:
            continue
        try:
            validate_event(event, 0, int(position.split("-")[0]))
        except InvalidArgument:
            continue  # a dead letter: the projector applies nothing of it either
        seen.add(event.event_id)
        ts = min(event.ts_ms, int(position.split("-")[0]))
        if event.type in OUTCOMES:
            recent = result.outcomes.setdefault(event.user_id, [])
            recent.append(event.item_id)
            del recent[:-history_cap]
        if event.type in COUNTED:
            kinds = result.counters.setdefault(event.item_id, {})
            value, at = kinds.get(event.type, (0.0, None))
            if at is None:
                value, at = 1.0, ts
            elif ts >= at:
                value, at = value * math.exp((at - ts) / tau_ms) + 1.0, ts
            else:
                value += math.exp((ts - at) / tau_ms)
            kinds[event.type] = (value, at)
    return result


async def read_log(
    client: aioredis.Redis, tenant: str, page: int = 1000
) -> list[tuple[str, events_pb2.Event | None]]:
    """Every entry of ``tenant``'s log, in order: its position and event (None when the
    entry is not a valid ``Event``, which the projector sends to the dead letters)."""
    entries: list[tuple[str, events_pb2.Event | None]] = []
    start = "-"
    while True:
        chunk = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await client.xrange(keys.events(tenant), min=start, count=page),
        )
        for raw_position, fields in chunk:
            try:
                event: events_pb2.Event | None = events_pb2.Event.FromString(fields.get(b"e", b""))
            except DecodeError:
                event = None
            entries.append((raw_position.decode(), event))
        if len(chunk) < page:
            return entries
        start = f"({entries[-1][0]}"


async def differences(client: aioredis.Redis, tenant: str, batch: Recomputed) -> list[str]:
    """Where the live projections of ``tenant`` differ from ``batch``, one line each
    (empty: they agree). Users and items the batch knows are compared."""
    found: list[str] = []
    async with client.pipeline(transaction=False) as pipe:
        for user in batch.outcomes:
            pipe.lrange(keys.outcomes(tenant, user), 0, -1)
        for item in batch.counters:
            pipe.hgetall(keys.item_counters(tenant, item))
        replies = await pipe.execute()
    for user, live in zip(batch.outcomes, replies[: len(batch.outcomes)], strict=True):
        items = [int(i) for i in cast(list[bytes], live)]
        if items != batch.outcomes[user]:
            found.append(f"outcomes of {user}: live {items}, log {batch.outcomes[user]}")
    for item, raw in zip(batch.counters, replies[len(batch.outcomes) :], strict=True):
        live_counts = {k.decode(): float(v) for k, v in cast(dict[bytes, bytes], raw).items()}
        for kind, (value, at) in batch.counters[item].items():
            stored, stored_at = live_counts.get(kind), live_counts.get(f"{kind}_at")
            if (
                stored is None
                or stored_at != at
                or not math.isclose(stored, value, rel_tol=TOLERANCE)
            ):
                found.append(
                    f"{kind} count of item {item}: live {stored} at {stored_at}, "
                    f"log {value:.12g} at {at}"
                )
    return found


async def verify(
    client: aioredis.Redis, tenants: Iterable[str], half_life_s: float, history_cap: int
) -> dict[str, list[str]]:
    """Per tenant, where its live projections differ from a recompute over its whole log
    (see :func:`differences`). Events the projector has not read yet show up as
    differences: verify a quiet log, or one whose lag is 0."""
    return {
        tenant: await differences(
            client, tenant, recompute(await read_log(client, tenant), half_life_s, history_cap)
        )
        for tenant in tenants
    }
