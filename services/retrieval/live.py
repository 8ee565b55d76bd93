"""A live ANN index over one artifact set: the set's own index plus items changed since.

The set's FAISS index (``ann.faiss``: flat, or IVF over a large catalogue) is read-only
and is never rebuilt while it is served. :class:`LiveIndex` layers the catalogue's changes
on it:

* a **delta index** (:class:`DeltaIndex`, exact inner product) holds every upserted item
  under its own id, new items and new versions of set items alike; an upsert of an id the
  delta holds replaces its vector;
* a **hidden set** of the set's own ids (row ids ``0..N-1``) that the main index must not
  return: set items deleted or unavailable, and set items whose current version lives in
  the delta. It is a bitmap of N bits (125 KB per million items) given to FAISS as an
  ``IDSelectorBitmap`` in the search parameters (``SearchParametersIVF`` with the index's
  own ``nprobe`` for IVF, ``SearchParameters`` otherwise), so the main index skips hidden
  ids while scanning and still returns ``k`` results: no over-fetching, and the recall of
  the index does not drop with deletions.

The delta is an ``IndexFlatIP`` whose rows are slots, with the slot's item id beside it,
not ``faiss.IndexIDMap2(IndexFlatIP(d))``: FAISS's ``remove_ids`` moves every row after the
first removed one and rebuilds the id map, O(delta) per call (measured at 1M items with a
delta of 100k: 149 replacements and 209 deletions per second, each holding the writer for
5-7 ms). Here a replaced or removed row becomes a tombstone, a cleared bit in the slots'
bitmap that searches skip through an ``IDSelectorBitmap``, and the rows are compacted once
tombstones are a quarter of them: O(1) amortised per write.

A search asks both indexes for their top ``k`` and keeps the best ``k`` of the union; an id
is in at most one of them (a set item in the delta is hidden in the main index), so no
deduplication is needed. The popular list (:attr:`RetrievalModels.popular_ids`) is served
minus removed items.

Concurrency contract:

* **Writers** (:meth:`upsert`, :meth:`remove`, :meth:`restore`) are meant to be called
  from one place (the event loop: the catalog projector applies the log in order). Each
  takes the instance's lock for its whole change, so concurrent writers are safe too, and
  the order in which they take it decides.
* **Readers** (:meth:`search`, :meth:`search_one`, :meth:`popular`, :meth:`counts`) may
  run on the loop or in worker threads. A search takes the lock only to search the delta
  (a FAISS index is not safe to search while ``add`` changes it) and to read the current
  hidden-set snapshot; it searches the main index outside the lock.
* **Swap by reference**: the hidden bitmap a search uses is never changed after it is
  published; a writer that hides or restores set ids copies it, changes the copy and
  publishes it (one reference assignment, under the lock), so a search sees one
  consistent state: the delta and the hidden set as of the same moment.
* What holding the lock costs the other side: a writer waits for at most one search's
  delta scan (0.3 ms with 10k delta items, 1.3 ms with 100k, at k = 500 on one core, see
  ``docs/bench/catalog_index.md``); a search waits for at most one write, or, once per a
  quarter of the delta's size in replacements and deletions, a compaction (a copy of the
  delta's live rows).
* Nothing here awaits: on the loop every call runs to completion, so a loop-only caller
  never contends for the lock at all.

Ids are non-negative int64 (FAISS answers -1 for "no result"). The delta grows with the
catalogue's changes until the next artifact set is built over the whole catalogue; its
memory is :meth:`memory`, its size :meth:`counts`.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidArgument
from services.retrieval.index import RetrievalModels

IDS = npt.NDArray[np.int64]
SCORES = npt.NDArray[np.float32]

_MAIN, _DELTA, _REMOVED = 0, 1, 2
"""State of a set item: served from the main index, from its delta copy, or not at all."""

PY_INT_BYTES = 32
"""Bytes of one Python int above 256 (28, allocated in 32)."""
COMPACT_MIN_TOMBSTONES = 1024
"""The delta compacts its rows once it holds at least this many tombstones and they are at
least a quarter of its rows."""


@dataclass(frozen=True)
class LiveCounts:
    """How many items the live index holds, for metrics.

    Attributes:
        set_items: items of the artifact set (the main index's size).
        set_removed: set items deleted or unavailable.
        set_overridden: set items served from their delta copy.
        delta_items: items in the delta (overrides included).
        new_items: delta items that are not set items.
        delta_tombstones: delta rows replaced or removed and not compacted yet.
    """

    set_items: int
    set_removed: int
    set_overridden: int
    delta_items: int
    new_items: int
    delta_tombstones: int = 0

    @property
    def servable(self) -> int:
        """Items a search can return."""
        return self.set_items - self.set_removed + self.new_items

    @property
    def hidden_in_main(self) -> int:
        """Set ids the main index skips (removed or overridden)."""
        return self.set_removed + self.set_overridden


@dataclass(frozen=True)
class LiveMemory:
    """Bytes held, by part.

    Attributes:
        main_bytes: the set's index (vectors, ids and IVF centroids; a lower bound, since
            FAISS's vectors may hold spare capacity); 0 for an index type not accounted.
        overlay_bytes: per set item state: one byte of state and the hidden bitmap (one
            bit), twice while a search holds an older bitmap.
        delta_bytes: the delta: its rows (tombstones included), their ids and bitmap, and
            the id -> row map.
    """

    main_bytes: int
    overlay_bytes: int
    delta_bytes: int


@dataclass(frozen=True)
class _View:
    """What a main-index search needs, never changed once published: the bitmap of the
    set ids it may return (None: all of them) and the FAISS objects that point into it."""

    bitmap: npt.NDArray[np.uint8] | None
    selector: Any
    params: Any


class DeltaIndex:
    """Exact inner-product index of vectors under any non-negative int64 ids, with O(1)
    amortised replacement and removal.

    Rows of an ``IndexFlatIP`` are slots; ``_ids[slot]`` is the slot's item id, bit ``slot``
    of ``_alive`` says whether it is the item's current row, and ``_slot_of`` maps each held
    id to its current slot. Replacing or removing clears the old slot's bit (a tombstone);
    searches pass the bitmap as an ``IDSelectorBitmap`` when there are tombstones, and the
    rows are rewritten without them once there are :data:`COMPACT_MIN_TOMBSTONES` and they
    are a quarter of the rows.

    Not thread-safe: :class:`LiveIndex` calls it under its lock.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._flat = faiss.IndexFlatIP(dim)
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=np.uint8)
        self._slot_of: dict[int, int] = {}
        self.tombstones = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._slot_of

    def add(self, ids: IDS, vectors: npt.NDArray[np.float32]) -> None:
        """Hold ``vectors [B, D]`` under ``ids [B]`` (distinct), replacing the rows of ids
        already held."""
        keys = ids.tolist()
        self._kill([slot for slot in map(self._slot_of.get, keys) if slot is not None])
        start = int(self._flat.ntotal)
        stop = start + len(keys)
        self._reserve(stop)
        self._flat.add(vectors)
        self._ids[start:stop] = ids
        slots = np.arange(start, stop, dtype=np.int64)
        np.bitwise_or.at(self._alive, slots >> 3, (1 << (slots & 7)).astype(np.uint8))
        self._slot_of.update(zip(keys, range(start, stop), strict=True))
        self._maybe_compact()

    def discard(self, ids: list[int]) -> int:
        """Stop holding ``ids``; returns how many were held."""
        popped = (self._slot_of.pop(item_id, None) for item_id in ids)
        slots = [slot for slot in popped if slot is not None]
        self._kill(slots)
        self._maybe_compact()
        return len(slots)

    def search(self, queries: npt.NDArray[np.float32], k: int) -> tuple[SCORES, IDS]:
        """FAISS's answer shape: scores and ids ``[B, min(k, len(self))]``, best first."""
        k = min(k, len(self))
        if self.tombstones == 0:
            scores, slots = self._flat.search(queries, k)
        else:
            params = faiss.SearchParameters()
            params.sel = faiss.IDSelectorBitmap(self._alive.size, faiss.swig_ptr(self._alive))
            scores, slots = self._flat.search(queries, k, params=params)
        ids = np.where(slots >= 0, self._ids[np.maximum(slots, 0)], -1)
        return scores, ids

    def nbytes(self) -> int:
        """Rows (tombstones included), slot ids and bitmap (with spare capacity), and the id
        -> slot map with its int objects."""
        rows = int(self._flat.ntotal) * int(self._flat.code_size)
        mapping = sys.getsizeof(self._slot_of) + 2 * PY_INT_BYTES * len(self._slot_of)
        return rows + self._ids.nbytes + self._alive.nbytes + mapping

    def _kill(self, slots: list[int]) -> None:
        if not slots:
            return
        dead = np.asarray(slots, dtype=np.int64)
        np.bitwise_and.at(self._alive, dead >> 3, ~(1 << (dead & 7)).astype(np.uint8))
        self.tombstones += len(slots)

    def _reserve(self, rows: int) -> None:
        """Room for ``rows`` slots in the id array and the bitmap (doubling)."""
        if rows <= self._ids.size:
            return
        capacity = max(rows, 2 * self._ids.size, 1024)
        ids = np.zeros(capacity, dtype=np.int64)
        ids[: self._ids.size] = self._ids
        alive = np.zeros((capacity + 7) // 8, dtype=np.uint8)
        alive[: self._alive.size] = self._alive
        self._ids, self._alive = ids, alive

    def _maybe_compact(self) -> None:
        rows = int(self._flat.ntotal)
        if self.tombstones < COMPACT_MIN_TOMBSTONES or 4 * self.tombstones < rows:
            return
        live = np.flatnonzero(np.unpackbits(self._alive, count=rows, bitorder="little"))
        vectors = self._flat.reconstruct_n(0, rows)[live]
        self._flat = faiss.IndexFlatIP(self.dim)
        self._flat.add(vectors)
        ids = self._ids[live]
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=np.uint8)
        self._reserve(ids.size)
        self._ids[: ids.size] = ids
        packed = np.packbits(np.ones(ids.size, dtype=bool), bitorder="little")
        self._alive[: packed.size] = packed
        self._slot_of = dict(zip(ids.tolist(), range(ids.size), strict=True))
        self.tombstones = 0


class LiveIndex:
    """The set's ANN index plus a delta of upserted items, minus removed items.

    Args:
        index: the set's FAISS inner-product index, row ids = set item ids ``0..N-1``;
            read, never changed (its ``nprobe``, for IVF, is the one searches use).
        popular_ids: the set's items by popularity, most popular first.
        popular_scores: their popularity, aligned with ``popular_ids``.

    :meth:`of` builds one over a :class:`RetrievalModels`.
    """

    def __init__(self, index: faiss.Index, popular_ids: IDS, popular_scores: SCORES) -> None:
        self.index = index
        self.dim = int(index.d)
        self.set_items = int(index.ntotal)
        self._popular_ids = np.asarray(popular_ids, dtype=np.int64)
        self._popular_scores = np.asarray(popular_scores, dtype=np.float32)
        self._ivf = faiss.try_extract_index_ivf(index)
        self._lock = threading.Lock()
        self._delta = DeltaIndex(self.dim)
        self._state = np.zeros(self.set_items, dtype=np.int8)
        self._bits = np.packbits(np.ones(self.set_items, dtype=bool), bitorder="little")
        self._overridden = 0
        self._hidden = 0
        """Set items not served from the main index (bits cleared)."""
        self._view = _View(None, None, None)

    @classmethod
    def of(cls, models: RetrievalModels) -> LiveIndex:
        """A live index over ``models``' ANN index and popular list, nothing changed yet."""
        return cls(models.index, models.popular_ids, models.popular_scores)

    # -- writers -------------------------------------------------------------------------

    def upsert(self, ids: IDS, embeddings: npt.NDArray[np.float32]) -> None:
        """Serve ``embeddings [B, D]`` under ``ids [B]``: new ids are added to the delta, ids
        the delta holds get the new vector, set items are hidden in the main index and
        served from the delta from now on (a removed one becomes servable again). Within
        one call the last row of a repeated id wins.

        Raises:
            InvalidArgument: negative ids, shapes that do not match, non-finite values.
        """
        ids = _check_ids(ids)
        vectors = np.asarray(embeddings)
        if vectors.ndim != 2 or vectors.shape != (ids.size, self.dim):
            raise InvalidArgument(
                f"embeddings must be [{ids.size}, {self.dim}], got {list(vectors.shape)}",
                field="embeddings",
            )
        if not np.isfinite(vectors).all():
            raise InvalidArgument("embeddings must be finite", field="embeddings")
        if ids.size == 0:
            return
        # Last occurrence of each id: unique over the reversed ids.
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.size - 1 - last)
        ids = ids[keep]
        vectors = np.ascontiguousarray(vectors[keep], dtype=np.float32)
        set_ids = ids[ids < self.set_items]
        with self._lock:
            states = self._state[set_ids]
            self._delta.add(ids, vectors)
            self._overridden += int(np.count_nonzero(states != _DELTA))
            self._state[set_ids] = _DELTA
            self._hide(set_ids[states == _MAIN])

    def remove(self, ids: IDS) -> int:
        """Never return ``ids`` again (deleted or unavailable items): delta copies are
        dropped, set items hidden. Unknown or already removed ids are ignored.

        Returns:
            How many of ``ids`` were servable before the call.

        Raises:
            InvalidArgument: negative ids.
        """
        ids = np.unique(_check_ids(ids))
        in_set = ids < self.set_items
        set_ids, other = ids[in_set], ids[~in_set]
        with self._lock:
            states = self._state[set_ids]
            overridden = set_ids[states == _DELTA]
            self._delta.discard(overridden.tolist())
            self._overridden -= int(overridden.size)
            new_items = self._delta.discard(other.tolist())
            self._state[set_ids] = _REMOVED
            self._hide(set_ids[states == _MAIN])
            return int(np.count_nonzero(states != _REMOVED)) + new_items

    def restore(self, ids: IDS) -> int:
        """Serve removed set items again, with the set's own embedding. Ids that are not
        removed set items are ignored: an item outside the set, or one whose features
        changed, comes back by :meth:`upsert` with its embedding.

        Returns:
            How many set items became servable.

        Raises:
            InvalidArgument: negative ids.
        """
        ids = np.unique(_check_ids(ids))
        set_ids = ids[ids < self.set_items]
        with self._lock:
            back = set_ids[self._state[set_ids] == _REMOVED]
            if back.size:
                self._state[back] = _MAIN
                self._hidden -= int(back.size)
                bits = self._bits.copy()
                np.bitwise_or.at(bits, back >> 3, (1 << (back & 7)).astype(np.uint8))
                self._publish(bits)
            return int(back.size)

    def _hide(self, set_ids: IDS) -> None:
        """Clear the bits of ``set_ids`` (all currently visible) in a copy of the bitmap and
        publish it; the caller holds the lock."""
        if set_ids.size == 0:
            return
        self._hidden += int(set_ids.size)
        bits = self._bits.copy()
        np.bitwise_and.at(bits, set_ids >> 3, ~(1 << (set_ids & 7)).astype(np.uint8))
        self._publish(bits)

    def _publish(self, bits: npt.NDArray[np.uint8]) -> None:
        self._bits = bits
        if self._hidden == 0:
            self._view = _View(None, None, None)
            return
        selector = faiss.IDSelectorBitmap(bits.size, faiss.swig_ptr(bits))
        params: faiss.SearchParameters
        if self._ivf is not None:
            ivf_params = faiss.SearchParametersIVF()
            # Search parameters replace the index's own: nprobe would fall back to 1.
            ivf_params.nprobe = int(self._ivf.nprobe)
            params = ivf_params
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        self._view = _View(bits, selector, params)

    # -- readers -------------------------------------------------------------------------

    def search(self, queries: npt.NDArray[np.float32], k: int) -> tuple[IDS, SCORES]:
        """Top ``k`` servable items by inner product for each query, best first.

        Args:
            queries: float32 ``[D]``, ``[1, D]`` or ``[B, D]``.
            k: results per query, at least 1.

        Returns:
            ``ids [B, k]`` int64 and ``scores [B, k]`` float32; when fewer than ``k`` items
            are servable (or the IVF probes find fewer), the tail is id -1 and score -inf.

        Raises:
            InvalidArgument: a query of another width, or ``k`` < 1.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidArgument(
                f"queries must be [batch, {self.dim}], got {list(np.shape(queries))}",
                field="queries",
            )
        if k < 1:
            raise InvalidArgument(f"k must be at least 1, got {k}", field="k")
        with self._lock:
            view = self._view
            delta_n = len(self._delta)
            if delta_n:
                delta_scores, delta_ids = self._delta.search(q, min(k, delta_n))
        if view.params is None:
            scores, ids = self.index.search(q, k)
        else:
            scores, ids = self.index.search(q, k, params=view.params)
        if delta_n:
            scores = np.concatenate([scores, delta_scores], axis=1)
            ids = np.concatenate([ids, delta_ids], axis=1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if scores.shape[1] > k or delta_n:
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        ids = np.where(np.isfinite(scores), ids, -1).astype(np.int64)
        return ids, scores

    def search_one(self, embedding: npt.NDArray[np.float32], k: int) -> tuple[IDS, SCORES]:
        """One query's top ``k`` as 1-D arrays, missing results dropped (the shape of
        :meth:`RetrievalModels.search`)."""
        ids, scores = self.search(embedding.reshape(1, -1), k)
        keep = ids[0] >= 0
        return ids[0][keep], scores[0][keep]

    def popular(self, k: int) -> tuple[IDS, SCORES]:
        """The set's ``k`` most popular servable items (fewer if the popular list runs
        out) and their popularity, most popular first."""
        ids, scores = self._popular_ids, self._popular_scores
        with self._lock:
            servable = self._state[ids] != _REMOVED
        return ids[servable][:k], scores[servable][:k]

    def counts(self) -> LiveCounts:
        """How many items each part holds."""
        with self._lock:
            removed = int(np.count_nonzero(self._state == _REMOVED))
            return LiveCounts(
                set_items=self.set_items,
                set_removed=removed,
                set_overridden=self._overridden,
                delta_items=len(self._delta),
                new_items=len(self._delta) - self._overridden,
                delta_tombstones=self._delta.tombstones,
            )

    def memory(self) -> LiveMemory:
        """Bytes held by the main index, the per-set-item overlay and the delta."""
        with self._lock:
            delta = self._delta.nbytes()
            overlay = self._state.nbytes + self._bits.nbytes
            if self._view.bitmap is not None and self._view.bitmap is not self._bits:
                overlay += self._view.bitmap.nbytes
        return LiveMemory(
            main_bytes=_index_bytes(self.index), overlay_bytes=overlay, delta_bytes=delta
        )


def _check_ids(ids: IDS) -> IDS:
    array = np.asarray(ids)
    if array.ndim != 1:
        raise InvalidArgument(f"ids must be a vector, got shape {list(array.shape)}", field="ids")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidArgument(f"ids must be integers, got {array.dtype}", field="ids")
    array = array.astype(np.int64, copy=False)
    if array.size and int(array.min()) < 0:
        raise InvalidArgument("ids must be non-negative", field="ids")
    return array


def _index_bytes(index: Any) -> int:
    """Bytes of a flat or IVF-flat index's vectors, ids and centroids (0 for others)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        centroids = int(ivf.nlist) * int(ivf.d) * 4
        return int(ivf.ntotal) * (int(ivf.code_size) + 8) + centroids
    if isinstance(index, faiss.IndexFlat):
        return int(index.ntotal) * int(index.code_size)
    return 0
