"""In-process LRU + TTL cache of item feature rows, shared by every tenant of the process.

Rows live in one float32 slab (grown by doubling up to the capacity), categories and
expiry times in parallel arrays; an ordered dict maps ``(tenant, item_id)`` to a slot and
keeps the least recently used entry first. The capacity follows from a byte budget:
``max_bytes // (4 * dim + 12 + ENTRY_OVERHEAD)`` entries, where ``ENTRY_OVERHEAD``
approximates what the index costs per entry, so the whole cache stays under the budget.

Rows of items the feature store did not know (served its default row) are never cached,
so an item written later is seen at once; every other row is stale for at most ``ttl_s``.
A change of row width (another artifact set) empties the cache.

Not thread-safe: one event loop per process calls it, and no method awaits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge

CACHE_LOOKUPS = Counter(
    "recmesh_ranking_item_cache_lookups_total",
    "Item feature cache lookups by result (hit or miss)",
    ["result"],
)

CACHE_HIT_RATIO = Gauge(
    "recmesh_ranking_item_cache_hit_ratio",
    "Share of item feature lookups served from the cache since start",
)

CACHE_ENTRIES = Gauge(
    "recmesh_ranking_item_cache_entries", "Item rows held by the item feature cache"
)

CACHE_BYTES = Gauge(
    "recmesh_ranking_item_cache_bytes", "Bytes the item feature cache reserved for rows"
)


ENTRY_OVERHEAD = 200
"""Approximate bytes per entry of the index (dict slot, key tuple, str and int objects)."""

_FIRST_SLAB = 4096


@dataclass(frozen=True)
class Cached:
    """The cached part of one lookup.

    ``hit[i]`` says whether ``ids[i]`` was cached; ``rows`` and ``categories`` hold the
    hits only, in the order of ``ids``.
    """

    hit: npt.NDArray[np.bool_]
    rows: npt.NDArray[np.float32]
    categories: npt.NDArray[np.int32]

    @property
    def hits(self) -> int:
        return int(self.hit.sum())


class ItemFeatureCache:
    """LRU + TTL cache of item rows, bounded by ``max_bytes``.

    Args:
        max_bytes: memory budget of rows and index; 0 disables the cache.
        ttl_s: seconds a row stays fresh.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.ttl_s = ttl_s
        self._clock = clock
        self._dim = 0
        self.capacity = 0
        self._index: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._rows = np.zeros((0, 0), dtype=np.float32)
        self._categories = np.zeros(0, dtype=np.int32)
        self._expires = np.zeros(0, dtype=np.float64)
        self._free: list[int] = []
        self._next = 0
        self.hits = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def hit_rate(self) -> float:
        """Share of looked-up ids found fresh in the cache since start (0 before any)."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def reserved_bytes(self) -> int:
        """Bytes held by the row slab and its parallel arrays."""
        return int(self._rows.nbytes + self._categories.nbytes + self._expires.nbytes)

    def lookup(self, tenant: str, ids: Sequence[int]) -> Cached:
        """The fresh cached rows among ``ids``; hits become most recently used."""
        n = len(ids)
        slots = np.full(n, -1, dtype=np.int64)
        if self._index:
            now = self._clock()
            index, expires = self._index, self._expires
            for position, item in enumerate(ids):
                key = (tenant, item)
                slot = index.get(key)
                if slot is None:
                    continue
                if expires[slot] <= now:
                    del index[key]
                    self._free.append(slot)
                    continue
                index.move_to_end(key)
                slots[position] = slot
        hit = slots >= 0
        taken = slots[hit]
        found = int(taken.size)
        self.hits += found
        self.lookups += n
        CACHE_LOOKUPS.labels("hit").inc(found)
        CACHE_LOOKUPS.labels("miss").inc(n - found)
        CACHE_HIT_RATIO.set(self.hit_rate)
        if found:
            rows = self._rows[taken]
            categories = self._categories[taken]
        else:
            rows = np.zeros((0, self._dim), dtype=np.float32)
            categories = np.zeros(0, dtype=np.int32)
        return Cached(hit, rows, categories)

    def put(
        self,
        tenant: str,
        ids: Sequence[int],
        rows: npt.NDArray[np.float32],
        categories: npt.NDArray[np.int32],
    ) -> None:
        """Store ``rows[i]`` and ``categories[i]`` for ``ids[i]``, evicting the LRU if full."""
        if not len(ids) or self.max_bytes == 0:
            return
        dim = int(rows.shape[1])
        if dim != self._dim:
            self._reset(dim)
        if self.capacity == 0:
            return
        slots = np.empty(len(ids), dtype=np.int64)
        index = self._index
        for position, item in enumerate(ids):
            key = (tenant, int(item))
            slot = index.get(key)
            if slot is None:
                slot = self._slot()
                index[key] = slot
            else:
                index.move_to_end(key)
            slots[position] = slot
        # A batch longer than the capacity reuses slots: the last writer of a slot wins,
        # and only the ids whose slot still maps to them are served later.
        self._rows[slots] = rows
        self._categories[slots] = categories
        self._expires[slots] = self._clock() + self.ttl_s
        CACHE_ENTRIES.set(len(index))
        CACHE_BYTES.set(self.reserved_bytes)

    def forget(self, tenant: str, ids: Sequence[int]) -> None:
        """Drop the rows of ``ids`` (their source changed: the next lookup misses them)."""
        for item in ids:
            slot = self._index.pop((tenant, int(item)), None)
            if slot is not None:
                self._free.append(slot)
        CACHE_ENTRIES.set(len(self._index))

    def _slot(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next < self.capacity:
            if self._next >= self._rows.shape[0]:
                self._grow(min(self.capacity, max(_FIRST_SLAB, 2 * self._rows.shape[0])))
            self._next += 1
            return self._next - 1
        _, slot = self._index.popitem(last=False)
        return slot

    def _grow(self, size: int) -> None:
        old = self._rows.shape[0]
        rows = np.zeros((size, self._dim), dtype=np.float32)
        rows[:old] = self._rows
        self._rows = rows
        self._categories = np.concatenate(
            [self._categories, np.full(size - old, -1, dtype=np.int32)]
        )
        self._expires = np.concatenate([self._expires, np.zeros(size - old)])

    def _reset(self, dim: int) -> None:
        self._dim = dim
        self.capacity = self.max_bytes // (4 * dim + 12 + ENTRY_OVERHEAD)
        self._index.clear()
        self._free.clear()
        self._next = 0
        self._rows = np.zeros((0, dim), dtype=np.float32)
        self._categories = np.zeros(0, dtype=np.int32)
        self._expires = np.zeros(0, dtype=np.float64)
