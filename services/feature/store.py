"""Feature views on Redis.

Key layout (every key of a tenant carries the ``{tenant}`` hash tag, so in Redis Cluster
a tenant's keys share a slot and a multi-key read stays one round trip):

* ``rm:{t}:meta`` — hash: ``user_dim``, ``item_dim``, ``version``, ``user_default``,
  ``item_default`` (packed rows), ``users``, ``items`` (counts at materialisation).
* ``rm:{t}:u:<user_id>`` — packed user row: ``user_dim`` little-endian float32.
* ``rm:{t}:h:<user_id>`` — list of the user's item ids from the artifact set (decimal), most
  recent last; replaced when a set is materialised.
* ``rm:{t}:o:<user_id>`` — list of the user's clicks and conversions projected from the
  event log by the projector, newest last; materialisation never touches it. A user's
  history is the two together, the projected outcomes last (the newest).
* ``rm:{t}:uc:<user_id>`` — hash: the user's clicks and conversions by item category, kept
  by the projector; served as shares (each count over their sum).
* ``rm:{t}:i:<item_id>`` — packed item row: ``item_dim`` float32 then one int32 category.
* ``rm:{t}:ic:<item_id>``, ``rm:{t}:tr`` — the item counters and the trending set the
  projector keeps from the event log; read only, decayed to the time of the read
  (:mod:`services.feature.counters`).

An item batch is one ``MGET`` of packed rows decoded with one ``numpy.frombuffer``.
Every round trip to Redis is a ``redis <COMMANDS>`` CLIENT span (``mesh.tracing.redis_span``),
except those of a bulk load (:meth:`RedisFeatureStore.load_items`), which runs in a worker
thread over a blocking connection.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from core import keys
from core.catalog import is_live
from core.replay import Projected, tau_ms
from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.redis import AsyncRedis, BlockingRedis, queue_mget, queue_mset
from mesh.settings import COUNTER_HALF_LIFE_S
from mesh.tracing import redis_span
from services.feature.counters import (
    Counters,
    Trending,
    decode_counters,
    queue_counters,
    read_trending,
)
from services.runtime.user_view import UserFeatures, read_user

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


def _item_layout(item_dim: int) -> np.dtype[np.void]:
    """The packed item row: ``item_dim`` float32 features then an int32 category."""
    return np.dtype([("features", "<f4", (item_dim,)), ("category", "<i4")])


@dataclass(frozen=True)
class ItemFeatures:
    """Rows for a batch of items, in request order.

    ``features`` has shape ``[len(ids), item_dim]``; ``categories`` is -1 and ``missing``
    True for unknown items, whose row is the view default.
    """

    features: F32
    categories: I32
    missing: npt.NDArray[np.bool_]
    counters: Counters | None = None
    """The decayed counters of the ids asked for them (see :meth:`FeatureStore.get_items`),
    ``None`` when none were."""


@dataclass(frozen=True)
class ItemChanges:
    """A page of the tenant's item changes (:meth:`FeatureStore.item_changes`)."""

    item_ids: list[int]
    as_of_ms: int
    """The latest change returned (the ``since_ms`` asked when none)."""
    more: bool
    """The limit cut the page: more changes wait after ``as_of_ms``."""


@dataclass(frozen=True)
class ItemStates:
    """Items' current state, in request order (:meth:`FeatureStore.item_states`)."""

    rows: ItemFeatures
    available: list[bool]
    """False for an item deleted, or upserted as not available (``core.keys.withdrawn``)."""
    names: list[str]
    """The tenant's own id of each of its own items; "" for the artifact set's items."""


@dataclass(frozen=True)
class ViewInfo:
    """What is materialised for a tenant."""

    version: str
    user_dim: int
    item_dim: int
    users: int
    items: int


class FeatureStore(abc.ABC):
    """Online feature views of one deployment; every method is scoped to ``tenant``."""

    @abc.abstractmethod
    async def info(self, tenant: str) -> ViewInfo | None:
        """The tenant's materialised views, or None when nothing was materialised."""

    @abc.abstractmethod
    async def get_user(self, tenant: str, user_id: str, history_limit: int) -> UserFeatures:
        """The user's row, last ``history_limit`` history entries (the materialised
        history, then the outcomes projected from the event log) and category shares, or
        the defaults."""

    @abc.abstractmethod
    async def get_materialised(self, tenant: str, user_id: str, history_limit: int) -> UserFeatures:
        """What materialisation wrote of the user (the row, or the defaults, and the last
        ``history_limit`` entries of the materialised history), nothing projected from the
        event log."""

    @abc.abstractmethod
    async def user_snapshot(self, tenant: str, user_id: str) -> Projected | None:
        """The user's part of the tenant's projection snapshot (``keys.snapshot``: the
        outcomes and category counts as of its log position, ``position`` set), or None
        when the tenant has no snapshot."""

    @abc.abstractmethod
    async def get_items(
        self, tenant: str, item_ids: Sequence[int], counter_ids: Sequence[int] = ()
    ) -> ItemFeatures:
        """Rows for ``item_ids`` in order (unknown ids get the default row) and, read in the
        same round trip, the counters of ``counter_ids`` decayed to now (in their order;
        ``counters`` is None when ``counter_ids`` is empty)."""

    @abc.abstractmethod
    async def get_trending(self, tenant: str, k: int, min_clicks: float) -> Trending:
        """The tenant's ``k`` items with the most clicks decayed to now, at least
        ``min_clicks`` each, most first."""

    @abc.abstractmethod
    async def write_users(
        self, tenant: str, user_ids: Sequence[str], rows: F32, histories: Sequence[Sequence[int]]
    ) -> int:
        """Upsert users; a non-empty history replaces the stored one. Returns rows written."""

    @abc.abstractmethod
    async def write_items(
        self,
        tenant: str,
        item_ids: Sequence[int],
        rows: F32,
        categories: Sequence[int],
        record: bool = True,
    ) -> int:
        """Upsert items, recorded in the tenant's item changes (:meth:`item_changes`) unless
        ``record`` is False (the bulk load of a whole set). Returns rows written."""

    @abc.abstractmethod
    async def item_changes(self, tenant: str, since_ms: int, limit: int = 0) -> ItemChanges:
        """Items :meth:`write_items` wrote (or the catalog changed) at or after
        ``since_ms``, oldest first, at most ``limit`` (0: all) except that a page never
        splits the changes of one millisecond: it then holds all of them, more than
        ``limit``. With ``more``, the next page starts at ``as_of_ms + 1``."""

    @abc.abstractmethod
    async def item_states(self, tenant: str, item_ids: Sequence[int]) -> ItemStates:
        """The current state of ``item_ids``: rows, availability and the tenant's names."""

    @abc.abstractmethod
    async def load_items(self, tenant: str, rows: F32, categories: I32) -> int:
        """Upsert items ``0 .. len(rows) - 1`` (``rows`` may be a memory map): the batch
        load of a whole catalogue. Returns rows written."""

    @abc.abstractmethod
    async def set_views(
        self,
        tenant: str,
        version: str,
        user_default: F32,
        item_default: F32,
        users: int,
        items: int,
    ) -> None:
        """Declare the tenant's view shapes, defaults and source version."""


class RedisFeatureStore(FeatureStore):
    """:class:`FeatureStore` on a Redis-protocol server.

    Args:
        client: asyncio Redis client (bytes responses).
        history_cap: history entries kept per user.
        bulk: blocking client of the same server for :meth:`load_items`, which uses it from
            two worker threads (two connections: one thread packs a round trip while the
            server applies the other's). Its commands are packed in C by hiredis, which the
            asyncio client does not do; ``None`` loads through ``client`` instead.
    """

    BULK_ROWS = 20_000
    """Items per round trip of a bulk load (ten ``MSET`` of 2000 keys in one pipeline)."""

    def __init__(
        self,
        client: AsyncRedis,
        history_cap: int = 200,
        bulk: BlockingRedis | None = None,
        half_life_s: float = COUNTER_HALF_LIFE_S,
    ) -> None:
        self._redis = client
        self._history_cap = history_cap
        self._bulk = bulk
        self._tau = tau_ms(half_life_s)

    async def info(self, tenant: str) -> ViewInfo | None:
        with redis_span("HGETALL", self._redis):
            meta = cast(dict[bytes, bytes], await self._redis.hgetall(keys.meta(tenant)))
        if not meta:
            return None
        return ViewInfo(
            version=meta[b"version"].decode(),
            user_dim=int(meta[b"user_dim"]),
            item_dim=int(meta[b"item_dim"]),
            users=int(meta[b"users"]),
            items=int(meta[b"items"]),
        )

    async def _defaults(self, tenant: str, field: bytes) -> F32:
        with redis_span("HGET", self._redis):
            raw = cast(bytes | None, await self._redis.hget(keys.meta(tenant), field))
        if raw is None:
            raise FailedPrecondition(f"no feature views are materialised for tenant {tenant!r}")
        return np.frombuffer(raw, dtype="<f4").copy()

    async def get_user(self, tenant: str, user_id: str, history_limit: int) -> UserFeatures:
        return await read_user(self._redis, tenant, user_id, history_limit)

    async def get_materialised(self, tenant: str, user_id: str, history_limit: int) -> UserFeatures:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.user_row(tenant, user_id))
            pipe.lrange(keys.history(tenant, user_id), -history_limit, -1)
            pipe.hget(keys.meta(tenant), "user_default")
            with redis_span("GET+LRANGE+HGET", self._redis):
                row, history, default = await pipe.execute()
        if default is None:
            raise FailedPrecondition(f"no feature views are materialised for tenant {tenant!r}")
        is_default = row is None
        features = np.frombuffer(default if is_default else row, dtype="<f4")
        return UserFeatures(features, [int(h) for h in history], is_default)

    async def user_snapshot(self, tenant: str, user_id: str) -> Projected | None:
        with redis_span("HGET", self._redis):
            state = cast(bytes | None, await self._redis.hget(keys.snapshot(tenant), "state"))
        if state is None:
            return None
        whole = Projected.from_bytes(state)
        return Projected(
            outcomes={user_id: whole.outcomes.get(user_id, [])},
            shares={user_id: whole.shares.get(user_id, {})},
            position=whole.position,
        )

    async def get_items(
        self, tenant: str, item_ids: Sequence[int], counter_ids: Sequence[int] = ()
    ) -> ItemFeatures:
        rows_keys = [keys.item_row(tenant, i) for i in item_ids]
        # Without rows to read, the view default is still read for its width, unless only
        # counters are asked for (then the answer has no rows and no width).
        with_rows = bool(rows_keys) or not counter_ids
        now_ms = int(time.time() * 1000)
        commands: list[str] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            if rows_keys:
                queue_mget(pipe, rows_keys)
                commands.append("MGET")
            if with_rows:
                pipe.hget(keys.meta(tenant), "item_default")
                commands.append("HGET")
            if counter_ids:
                queue_counters(pipe, tenant, counter_ids)
                commands.append("EVAL")
            with redis_span(
                "+".join(commands), self._redis, keys=len(rows_keys) + len(counter_ids)
            ):
                replies = await pipe.execute()
        rows: list[bytes | None] = replies.pop(0) if rows_keys else []
        default_raw = replies.pop(0) if with_rows else None
        counters = (
            decode_counters(replies[0], len(counter_ids), now_ms, self._tau)
            if counter_ids
            else None
        )
        if not with_rows:
            return ItemFeatures(
                np.zeros((0, 0), np.float32), np.zeros(0, np.int32), np.zeros(0, bool), counters
            )
        if default_raw is None:
            raise FailedPrecondition(f"no feature views are materialised for tenant {tenant!r}")
        default_row = np.frombuffer(default_raw, dtype="<f4")
        layout = _item_layout(default_row.size)
        missing = np.fromiter((r is None for r in rows), dtype=bool, count=len(rows))
        filler = default_row.tobytes() + np.int32(-1).tobytes()
        records = np.frombuffer(b"".join(filler if r is None else r for r in rows), dtype=layout)
        return ItemFeatures(
            np.ascontiguousarray(records["features"]),
            records["category"].copy(),
            missing,
            counters,
        )

    async def get_trending(self, tenant: str, k: int, min_clicks: float) -> Trending:
        with redis_span("ZRANGE", self._redis):
            return await read_trending(
                self._redis, tenant, k, min_clicks, int(time.time() * 1000), self._tau
            )

    async def _dims(self, tenant: str) -> tuple[int, int]:
        info = await self.info(tenant)
        if info is None:
            raise FailedPrecondition(f"no feature views are materialised for tenant {tenant!r}")
        return info.user_dim, info.item_dim

    async def write_users(
        self, tenant: str, user_ids: Sequence[str], rows: F32, histories: Sequence[Sequence[int]]
    ) -> int:
        user_dim, _ = await self._dims(tenant)
        if rows.ndim != 2 or rows.shape != (len(user_ids), user_dim):
            raise InvalidArgument(
                f"user rows must have shape [{len(user_ids)}, {user_dim}], got {list(rows.shape)}",
                field="users.features",
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, row, history in zip(user_ids, rows, histories, strict=True):
                pipe.set(keys.user_row(tenant, user_id), row.astype("<f4").tobytes())
                if history:
                    key = keys.history(tenant, user_id)
                    pipe.delete(key)
                    pipe.rpush(key, *[str(int(h)) for h in history[-self._history_cap :]])
            with redis_span("PIPELINE", self._redis, keys=len(user_ids)):
                await pipe.execute()
        return len(user_ids)

    async def write_items(
        self,
        tenant: str,
        item_ids: Sequence[int],
        rows: F32,
        categories: Sequence[int],
        record: bool = True,
    ) -> int:
        _, item_dim = await self._dims(tenant)
        if rows.ndim != 2 or rows.shape != (len(item_ids), item_dim):
            raise InvalidArgument(
                f"item rows must have shape [{len(item_ids)}, {item_dim}], got {list(rows.shape)}",
                field="features",
            )
        if len(categories) != len(item_ids):
            raise InvalidArgument("one category per item is required", field="categories")
        packed = np.empty(len(item_ids), dtype=_item_layout(item_dim))
        packed["features"] = rows
        packed["category"] = categories
        mapping = {
            keys.item_row(tenant, int(i)): packed[n].tobytes() for n, i in enumerate(item_ids)
        }
        if not record:
            with redis_span("MSET", self._redis, keys=len(mapping)):
                await self._redis.mset(mapping)
            return len(item_ids)
        now_ms = int(time.time() * 1000)
        pipe = self._redis.pipeline(transaction=True)
        queue_mset(pipe, mapping)
        pipe.zadd(keys.item_changes(tenant), {str(int(i)): now_ms for i in item_ids})
        with redis_span("MULTI MSET+ZADD", self._redis, keys=len(mapping)):
            await pipe.execute()
        return len(item_ids)

    async def item_changes(self, tenant: str, since_ms: int, limit: int = 0) -> ItemChanges:
        with redis_span("ZRANGEBYSCORE", self._redis):
            found = cast(
                list[tuple[bytes, float]],
                await self._redis.zrangebyscore(
                    keys.item_changes(tenant),
                    since_ms,
                    "+inf",
                    start=0 if limit else None,
                    num=limit + 1 if limit else None,
                    withscores=True,
                ),
            )
        more = bool(limit) and len(found) > limit
        if more:
            last = found[limit - 1][1]
            if found[limit][1] == last:
                # The page would split the changes of one millisecond: it takes all of them
                # (the next page starts after that millisecond).
                with redis_span("ZRANGEBYSCORE", self._redis):
                    group = cast(
                        list[tuple[bytes, float]],
                        await self._redis.zrangebyscore(
                            keys.item_changes(tenant), last, last, withscores=True
                        ),
                    )
                found = [change for change in found[:limit] if change[1] < last] + group
            else:
                found = found[:limit]
        ids = [int(member) for member, _ in found]
        return ItemChanges(ids, max([since_ms, *(int(score) for _, score in found)]), more)

    async def item_states(self, tenant: str, item_ids: Sequence[int]) -> ItemStates:
        rows = await self.get_items(tenant, item_ids)
        live = [i for i in item_ids if is_live(i)]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.smismember(keys.withdrawn(tenant), [str(i) for i in item_ids] or ["-"])
            pipe.hmget(keys.item_names(tenant), [str(i) for i in live] or ["-"])
            with redis_span("SMISMEMBER+HMGET", self._redis, keys=len(item_ids)):
                withdrawn, names = await pipe.execute()
        named = {i: (n or b"").decode() for i, n in zip(live, names, strict=False)}
        return ItemStates(
            rows,
            [not bool(w) for w in withdrawn[: len(item_ids)]],
            [named.get(i, "") for i in item_ids],
        )

    async def load_items(self, tenant: str, rows: F32, categories: I32) -> int:
        """The bulk load, then the rows the tenant itself wrote for set items (the catalog's
        upserts, ``WriteItemFeatures``) put back: a new set never undoes a tenant's write."""
        _, item_dim = await self._dims(tenant)
        if rows.ndim != 2 or rows.shape[1] != item_dim or len(categories) != rows.shape[0]:
            raise InvalidArgument(
                f"item rows must have shape [n, {item_dim}] with one category each",
                field="features",
            )
        written = [i for i in (await self.item_changes(tenant, 0)).item_ids if i < rows.shape[0]]
        kept = cast(
            list[bytes | None],
            await self._redis.mget([keys.item_row(tenant, i) for i in written]) if written else [],
        )
        loaded = await self._load_items(tenant, rows, categories, item_dim)
        width = _item_layout(item_dim).itemsize
        restore = {
            keys.item_row(tenant, i): raw
            for i, raw in zip(written, kept, strict=True)
            if raw is not None and len(raw) == width
        }
        if restore:
            await self._redis.mset(restore)
        return loaded

    async def _load_items(self, tenant: str, rows: F32, categories: I32, item_dim: int) -> int:
        if self._bulk is None:
            for start in range(0, rows.shape[0], 2000):
                stop = min(start + 2000, rows.shape[0])
                await self.write_items(
                    tenant,
                    range(start, stop),
                    np.asarray(rows[start:stop], dtype=np.float32),
                    categories[start:stop].tolist(),
                    record=False,
                )
            return int(rows.shape[0])
        bulk = self._bulk
        layout = _item_layout(item_dim)

        def load(part: int) -> None:
            for start in range(part * self.BULK_ROWS, rows.shape[0], 2 * self.BULK_ROWS):
                stop = min(start + self.BULK_ROWS, rows.shape[0])
                packed = np.empty(stop - start, dtype=layout)
                packed["features"] = rows[start:stop]
                packed["category"] = categories[start:stop]
                raw, width = packed.tobytes(), layout.itemsize
                with bulk.pipeline(transaction=False) as pipe:
                    for first in range(start, stop, 2000):
                        queue_mset(
                            pipe,
                            {
                                keys.item_row(tenant, item): raw[
                                    (item - start) * width : (item - start + 1) * width
                                ]
                                for item in range(first, min(first + 2000, stop))
                            },
                        )
                    pipe.execute()

        # Both threads run to their end before a failure is raised, so none is left writing
        # through ``bulk`` after this returns (or after a shutdown closes it).
        results = await asyncio.gather(
            asyncio.to_thread(load, 0), asyncio.to_thread(load, 1), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return int(rows.shape[0])

    async def set_views(
        self,
        tenant: str,
        version: str,
        user_default: F32,
        item_default: F32,
        users: int,
        items: int,
    ) -> None:
        with redis_span("HSET", self._redis):
            await self._redis.hset(
                keys.meta(tenant),
                mapping={
                    "version": version,
                    "user_dim": user_default.size,
                    "item_dim": item_default.size,
                    "user_default": user_default.astype("<f4").tobytes(),
                    "item_default": item_default.astype("<f4").tobytes(),
                    "users": users,
                    "items": items,
                },
            )
