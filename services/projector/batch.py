"""The projections recomputed from the log in one pass (batch), read back from Redis, and
compared (kappa: one set of rules, two ways of running them).

:func:`recompute` applies the rules of :mod:`core.replay` to a tenant's stored events in
log order, from a snapshot or from the start. :func:`read_projections` reads what the
projector (or a rebuild, in its own namespace) wrote to Redis, every key of the
namespace. :func:`compare` lists where two of them differ; ``recmesh projections verify``
and ``recmesh projections rebuild --verify`` exit non-zero on any difference.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from core import keys
from core.logread import dead_lettered, iter_log
from core.replay import Projected, Replay, decayed, tau_ms
from mesh.redis import AsyncRedis

TOLERANCE = 1e-9
"""Relative difference of two decayed counts (absolute, of two trending scores) still
taken as equal: Lua and Python round the same sums in different orders."""


async def item_categories(client: AsyncRedis, tenant: str, items: Iterable[int]) -> dict[int, int]:
    """The category of each of ``items`` that has a feature row (the row's last four
    bytes, as the projector reads them); items without a row are left out."""
    wanted = list(items)
    if not wanted:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for item in wanted:
            pipe.getrange(keys.item_row(tenant, item), -4, -1)
        tails = cast(list[bytes], await pipe.execute())
    return {
        item: int.from_bytes(tail, "little", signed=True)
        for item, tail in zip(wanted, tails, strict=True)
        if len(tail) == 4
    }


async def recompute(
    client: AsyncRedis,
    tenant: str,
    half_life_s: float,
    history_cap: int,
    start: Projected | None = None,
    until: str = "+",
) -> Projected:
    """The projections of ``tenant``'s log up to ``until``: ``start`` (a snapshot) and
    the entries after its position, or the whole log when ``start`` is None, leaving out
    the entries the projector dead-lettered (:func:`dead_lettered`). Item categories are
    read from the live feature rows as the pages go."""
    categories: dict[int, int] = {}
    replay = Replay(half_life_s, history_cap, categories, start)
    known: set[int] = set()
    given_up = await dead_lettered(client, tenant)
    after = start.position if start is not None else ""
    async for entries in iter_log(client, tenant, after, until):
        new = {e.item_id for _, e in entries if e is not None and e.item_id not in known}
        categories.update(await item_categories(client, tenant, new))
        known |= new
        replay.apply_all((p, None if p in given_up else e) for p, e in entries)
    return replay.state


@dataclass
class Live:
    """What is stored in one namespace of a tenant's projections."""

    projected: Projected
    trending: dict[int, float] = field(default_factory=dict)


async def _owned(client: AsyncRedis, prefix: str, list_kind: bool) -> dict[str, object]:
    """Every key starting with ``prefix`` (a key function's name for the owner ""), by
    its owner (the rest of the name), with its value: a list, or a hash as text."""
    names = [key.decode() async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            (pipe.lrange(name, 0, -1) if list_kind else pipe.hgetall(name))
        replies = await pipe.execute()
    return {name[len(prefix) :]: reply for name, reply in zip(names, replies, strict=True)}


def _text_hash(reply: object) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], reply).items()}


async def read_projections(client: AsyncRedis, tenant: str, namespace: str = "") -> Live:
    """Every projection of ``tenant`` stored in ``namespace`` ("" = the live ones): found
    by key (``SCAN``), so a stored projection no event explains shows up too."""
    found = Live(Projected())
    outcomes = await _owned(client, keys.outcomes(tenant, "", namespace), list_kind=True)
    for user, reply in outcomes.items():
        found.projected.outcomes[user] = [int(i) for i in cast(list[bytes], reply)]
    shares = await _owned(client, keys.category_shares(tenant, "", namespace), list_kind=False)
    for user, reply in shares.items():
        found.projected.shares[user] = {int(c): int(n) for c, n in _text_hash(reply).items()}
    counters = await _owned(client, keys.item_counters(tenant, "", namespace), list_kind=False)
    for item, reply in counters.items():
        raw = _text_hash(reply)
        found.projected.counters[int(item)] = {
            kind: (float(raw[kind]), int(raw[f"{kind}_at"]))
            for kind in raw
            if not kind.endswith("_at")
        }
    scored = cast(
        list[tuple[bytes, float]],
        await client.zrange(keys.trending(tenant, namespace), 0, -1, withscores=True),
    )
    found.trending = {int(item): score for item, score in scored}
    return found


def compare(expected: Live, actual: Live, half_life_s: float, limit: int = 1000) -> list[str]:
    """Where ``actual`` differs from ``expected``, one line each (at most ``limit``;
    empty: they agree). Two counters of one kind agree when their values decayed to the
    later of their two times agree (an erasure keeps a counter's time when it takes an
    event out, so the same count can be stored as of another time)."""
    tau = tau_ms(half_life_s)
    lines: list[str] = []
    a, b = expected.projected, actual.projected
    for user in sorted(a.outcomes.keys() | b.outcomes.keys()):
        if a.outcomes.get(user, []) != b.outcomes.get(user, []):
            lines.append(f"outcomes of {user}: {b.outcomes.get(user)} != {a.outcomes.get(user)}")
    for user in sorted(a.shares.keys() | b.shares.keys()):
        if a.shares.get(user, {}) != b.shares.get(user, {}):
            lines.append(f"category shares of {user}: {b.shares.get(user)} != {a.shares.get(user)}")
    for item in sorted(a.counters.keys() | b.counters.keys()):
        mine, theirs = a.counters.get(item, {}), b.counters.get(item, {})
        for kind in sorted(mine.keys() | theirs.keys()):
            want, got = mine.get(kind), theirs.get(kind)
            if (
                want is None
                or got is None
                or not math.isclose(
                    decayed(*want, max(want[1], got[1]), tau),
                    decayed(*got, max(want[1], got[1]), tau),
                    rel_tol=TOLERANCE,
                )
            ):
                lines.append(f"{kind} count of item {item}: {got} != {want}")
    for item in sorted(expected.trending.keys() | actual.trending.keys()):
        want_score, got_score = expected.trending.get(item), actual.trending.get(item)
        if (
            want_score is None
            or got_score is None
            or not math.isclose(want_score, got_score, rel_tol=0.0, abs_tol=TOLERANCE)
        ):
            lines.append(f"trending score of item {item}: {got_score} != {want_score}")
    return lines[:limit]


def expected(projected: Projected, half_life_s: float) -> Live:
    """What the namespace that holds ``projected`` stores, the trending set included."""
    return Live(projected, projected.trending(tau_ms(half_life_s)))


# KEYS: the snapshot hash. ARGV: SHA-1 of the state the new one was computed from ("" for
# none), position, time, state, trimmed-to position ("" keeps the stored one).
# Returns 1 when stored, 0 when the stored state changed meanwhile.
_STORE = """
local stored = redis.call('HGET', KEYS[1], 'state')
local digest = stored and redis.sha1hex(stored) or ''
if digest ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'position', ARGV[2], 'taken_ms', ARGV[3], 'state', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'trimmed_to', ARGV[5]) end
return 1
"""


@dataclass(frozen=True)
class Snapshot:
    """A stored snapshot as read: the projections, and what compare-and-set needs."""

    projected: Projected
    digest: str
    """SHA-1 (hex) of the stored state."""
    trimmed_to: str
    """The position the log was trimmed to behind this snapshot ("" when never)."""


async def read_snapshot(client: AsyncRedis, tenant: str) -> Snapshot | None:
    """The tenant's stored snapshot (``keys.snapshot``), or None when it has none."""
    state, trimmed = cast(
        list[bytes | None], await client.hmget(keys.snapshot(tenant), ["state", "trimmed_to"])
    )
    if state is None:
        return None
    return Snapshot(
        Projected.from_bytes(state), hashlib.sha1(state).hexdigest(), (trimmed or b"").decode()
    )


async def load_snapshot(client: AsyncRedis, tenant: str) -> Projected | None:
    """The projections of the tenant's stored snapshot, or None when it has none."""
    found = await read_snapshot(client, tenant)
    return found.projected if found is not None else None


async def store_snapshot(
    client: AsyncRedis,
    tenant: str,
    projected: Projected,
    computed_from: Snapshot | None,
    trimmed_to: str,
) -> bool:
    """Store ``projected`` as the tenant's snapshot if the stored one is still the one it
    was ``computed_from`` (None: there was none); returns False when another was stored
    meanwhile (an erasure's edit, another snapshot), which the caller computes from
    again. One script: a reader sees the old snapshot or the new, never a mix."""
    stored = await client.eval(
        _STORE,
        1,
        keys.snapshot(tenant),
        computed_from.digest if computed_from is not None else "",
        projected.position,
        str(int(time.time() * 1000)),
        projected.to_bytes(),
        trimmed_to,
    )
    return bool(stored)


async def verify(
    client: AsyncRedis, tenants: Sequence[str], half_life_s: float, history_cap: int
) -> dict[str, list[str]]:
    """Per tenant, where its live projections differ from a recompute over its log (from
    its snapshot, when it has one, and the entries after it). Events the projector has not
    read yet show up as differences: verify a quiet log, or one whose lag is 0."""
    found: dict[str, list[str]] = {}
    for tenant in tenants:
        base = await load_snapshot(client, tenant)
        batch = await recompute(client, tenant, half_life_s, history_cap, base)
        found[tenant] = compare(
            expected(batch, half_life_s), await read_projections(client, tenant), half_life_s
        )
    return found
