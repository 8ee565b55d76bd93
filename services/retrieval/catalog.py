"""The live catalog as retrieval serves it: each tenant's changed items, embedded by the
served set's item tower into a :class:`~services.retrieval.live.LiveIndex`.

The projector applies the log's catalog events to the feature store and records every
changed item in the tenant's item changes (``core.keys.item_changes``). Each process keeps,
per tenant, the state of every changed item (row, category, availability, name) read from
``GetItemChanges`` with ``with_state``, and a live index built from it for the set it
serves:

* **Refresh.** Like the trending list (:mod:`services.retrieval.trending`): a request that
  finds its tenant's catalog ``refresh_s`` old starts one refresh (unless one is in
  flight), which reads every change since the last one read (pages of ``page`` items),
  from ``OVERLAP_MS`` before it (a change scored by a writer's clock may land late), and
  applies the items whose state changed. A request that finds the catalog older than
  ``max_age_s`` waits for the refresh, at most ``wait_s``; if it is still older then, the
  answer names ``catalog`` in ``degraded``. Under traffic a change is served within
  ``refresh_s`` plus one refresh plus the projector's lag; the bar is 1 s.
* **Another set.** The state does not depend on the models; the live index does. When the
  served set changes (hot swap, rollback), the next request of a tenant rebuilds its index
  from the state with the new set's item tower: a rollout never loses an upsert.
* **What is never served.** Items withdrawn (deleted, or upserted as not available) leave
  the index, and :meth:`CatalogView.servable` filters the other sources (trending, popular,
  fresh) by the same state.
* **Fresh items.** The tenant's own items (not the set's) that may be served, newest change
  first: the ``fresh`` candidate source, for cold start.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core.catalog import LIVE_BASE, is_live
from core.validation import matrix_from_proto
from mesh import tracing
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.context import detached
from mesh.cpu import billed
from services.retrieval.index import UNKNOWN_CATEGORY, RetrievalModels
from services.retrieval.live import LiveIndex

log = logging.getLogger(__name__)

OVERLAP_MS = 1000
"""How far before the last change read a refresh reads again."""
CALL_CAP_S = 2.0
"""The least time one ``GetItemChanges`` call of a refresh may take. A refresh runs in the
background (requests wait for it at most ``wait_s``), so a busy feature service slows it
rather than failing it over and over."""
MAX_PAGES = 200
"""Most pages one refresh reads; the next refresh goes on from where it stopped."""
FRESH_HEAD = 2000
"""Newest servable own items a request may take as fresh candidates (retrieval's max_k)."""

REFRESHES = Counter(
    "recmesh_retrieval_catalog_refreshes_total",
    "Refreshes of a tenant's live catalog from the feature service, by outcome (ok, failed)",
    ["tenant", "outcome"],
)
CHANGED = Counter(
    "recmesh_retrieval_catalog_items_total",
    "Catalog items applied to the live index, by what happened (upserted, withdrawn)",
    ["tenant", "change"],
)
LIVE_ITEMS = Gauge(
    "recmesh_retrieval_catalog_changed_items",
    "Items of the tenant changed since the served set was built (held in memory)",
    ["tenant"],
)

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass
class _Item:
    features: bytes
    category: int
    available: bool


@dataclass
class _Tenant:
    items: dict[int, _Item] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    fresh: dict[int, None] = field(default_factory=dict)
    """The tenant's own servable items, oldest change first (a dict keeps the order)."""
    withdrawn_ids: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    fresh_head: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    own_ids: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    """What requests read, rebuilt once per refresh that changed something (not per
    request): the withdrawn ids, the :data:`FRESH_HEAD` newest servable own items, and
    every servable own item."""
    since_ms: int = 0
    fetched_at: float = -np.inf
    started_at: float = -np.inf
    error: str = ""
    task: asyncio.Task[None] | None = None
    index: LiveIndex | None = None
    models: RetrievalModels | None = None


@dataclass(frozen=True)
class CatalogView:
    """What one request serves of its tenant's catalog."""

    index: LiveIndex
    names: dict[int, str]
    withdrawn: I64
    """The tenant's withdrawn items, sorted."""
    fresh: I64
    """The tenant's own servable items, newest change first (at most :data:`FRESH_HEAD`)."""
    own: I64
    """Every servable own item of the tenant, sorted: one the catalog never had (an id only
    events named) is not served, whatever source offers it (trending: it was clicked)."""
    problem: str = ""
    """Why the catalog may be stale ("" when it is fresh)."""

    def servable(self, ids: I64) -> npt.NDArray[np.bool_]:
        """Which of ``ids`` may be served: not withdrawn, and a tenant's own item only when
        the catalog holds it (upserted, available)."""
        ok = ~_members(ids, self.withdrawn)
        live = ids >= LIVE_BASE
        if live.any():
            ok &= ~live | _members(ids, self.own)
        return ok


class LiveCatalog:
    """Per-tenant catalog state and live indexes (see the module docstring).

    Args:
        features: the feature service.
        refresh_s: a catalog this old is refreshed; also each call's cap.
        max_age_s: a request waits for a catalog older than this.
        wait_s: how long it waits.
        page: changes per ``GetItemChanges`` call (at most the feature service's batch).
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        *,
        refresh_s: float,
        max_age_s: float,
        wait_s: float,
        page: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._features = features
        self._refresh_s = refresh_s
        self._max_age_s = max_age_s
        self._wait_s = wait_s
        self._page = page
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    async def view(self, tenant: str, models: RetrievalModels) -> CatalogView:
        """``tenant``'s catalog for a request served by ``models``, refreshed as the module
        docstring says. Never raises for a failed refresh: the view then says why.

        ``tenant`` must be the current request's (the refresh calls in its name).
        """
        entry = self._tenants.setdefault(tenant, _Tenant())
        now = self._clock()
        if (
            entry.task is None
            and now - entry.fetched_at >= self._refresh_s
            and now - entry.started_at >= self._refresh_s
        ):
            entry.started_at = now
            entry.task = asyncio.create_task(
                billed(tenant, self._refresh(tenant, entry)), context=detached()
            )
        if now - entry.fetched_at > self._max_age_s and entry.task is not None:
            await asyncio.wait([asyncio.shield(entry.task)], timeout=self._wait_s)
        problem = ""
        if self._clock() - entry.fetched_at > self._max_age_s:
            problem = f"catalog not refreshed: {entry.error or 'refresh still running'}"
        if entry.models is not models or entry.index is None:
            self._rebuild(entry, models)
        assert entry.index is not None
        return CatalogView(
            entry.index,
            entry.names,
            entry.withdrawn_ids,
            entry.fresh_head,
            entry.own_ids,
            problem,
        )

    def _rebuild(self, entry: _Tenant, models: RetrievalModels) -> None:
        """A live index for ``models`` from the whole state (a new tenant, another set)."""
        entry.index = LiveIndex.of(models)
        entry.models = models
        _arrays(entry)
        self._apply(entry, list(entry.items))

    def _apply(self, entry: _Tenant, ids: list[int]) -> tuple[int, int]:
        """Bring ``ids`` of the state into the entry's index; (upserted, withdrawn)."""
        index, models = entry.index, entry.models
        if index is None or models is None or not ids:
            return 0, 0
        shown = [i for i in ids if entry.items[i].available]
        gone = np.asarray([i for i in ids if not entry.items[i].available], dtype=np.int64)
        if gone.size:
            index.remove(gone)
        if shown:
            width = models.item_dim
            rows = [entry.items[i] for i in shown]
            usable = [len(r.features) == 4 * width for r in rows]
            ids_ok = np.asarray([i for i, ok in zip(shown, usable, strict=True) if ok], np.int64)
            if ids_ok.size:
                features = np.frombuffer(
                    b"".join(r.features for r, ok in zip(rows, usable, strict=True) if ok), "<f4"
                ).reshape(-1, width)
                categories = np.asarray(
                    [r.category for r, ok in zip(rows, usable, strict=True) if ok], np.int64
                )
                known = (categories >= 0) & (categories < models.n_categories)
                categories = np.where(known, categories, UNKNOWN_CATEGORY)
                index.upsert(ids_ok, models.embed_items(np.ascontiguousarray(features), categories))
        return len(shown), int(gone.size)

    async def _refresh(self, tenant: str, entry: _Tenant) -> None:
        """Read the changes since the last refresh and apply them (the outcome in ``entry``).

        What a refresh read is applied even when a later page of it fails: ``_take``
        records each item's state as it reads it, and a state recorded but never applied
        would never be applied (the next read finds it unchanged)."""
        sent = self._clock()
        changed: list[int] = []
        try:
            with tracing.tracer.start_as_current_span(
                "retrieval.catalog_refresh",
                context=tracing.ROOT,
                attributes=tracing.recmesh_attributes(tenant=tenant),
            ):
                await self._read(entry, changed)
            entry.fetched_at = sent
            entry.error = ""
            REFRESHES.labels(tenant, "ok").inc()
        except CALL_FAILURES as exc:
            entry.error = describe_failure(exc)
            REFRESHES.labels(tenant, "failed").inc()
            log.warning("catalog of %s not refreshed: %s", tenant, entry.error)
        except Exception as exc:  # a bug must not fail the requests that wait for it
            entry.error = describe_failure(exc)
            REFRESHES.labels(tenant, "failed").inc()
            log.exception("catalog of %s not refreshed", tenant)
        finally:
            entry.task = None
            try:
                self._commit(tenant, entry, changed)
            except Exception:
                entry.index = None  # the next request rebuilds it from the whole state
                log.exception("catalog changes of %s not applied; index to be rebuilt", tenant)

    async def _read(self, entry: _Tenant, changed: list[int]) -> None:
        """Read every change since the last read, page by page, recording each item's state
        (``_take``) and adding the changed ids to ``changed`` as it goes."""
        features = self._features
        since = max(0, entry.since_ms - OVERLAP_MS) if entry.since_ms else 0
        for _ in range(MAX_PAGES):
            reply: feature_pb2.GetItemChangesResponse = await features.call(
                features.stub.GetItemChanges,
                feature_pb2.GetItemChangesRequest(
                    since_ms=since, with_state=True, limit=self._page
                ),
                cap_s=max(self._refresh_s, CALL_CAP_S),
                idempotent=True,
            )
            changed += self._take(entry, reply)
            entry.since_ms = max(entry.since_ms, reply.as_of_ms)
            if not reply.more:
                return
            since = reply.as_of_ms + 1  # a page holds every change of its last ms

    def _commit(self, tenant: str, entry: _Tenant, changed: list[int]) -> None:
        """Apply ``changed`` to the index and rebuild what requests read of the state."""
        if changed:
            _arrays(entry)
        upserted, withdrawn = self._apply(entry, changed)
        CHANGED.labels(tenant, "upserted").inc(upserted)
        CHANGED.labels(tenant, "withdrawn").inc(withdrawn)
        LIVE_ITEMS.labels(tenant).set(len(entry.items))

    @staticmethod
    def _take(entry: _Tenant, reply: feature_pb2.GetItemChangesResponse) -> list[int]:
        """Record the state of ``reply``'s items in ``entry``; the ids whose state changed."""
        ids = list(reply.item_ids)
        if not ids:
            return []
        rows = matrix_from_proto(reply.features, len(ids), "features")
        changed = []
        for n, item_id in enumerate(ids):
            state = _Item(rows[n].tobytes(), int(reply.categories[n]), bool(reply.available[n]))
            if reply.names[n]:
                entry.names[item_id] = reply.names[n]
            if entry.items.get(item_id) == state:
                continue
            entry.items[item_id] = state
            changed.append(item_id)
            if is_live(item_id):
                entry.fresh.pop(item_id, None)
                if state.available:
                    entry.fresh[item_id] = None
        return changed

    async def close(self) -> None:
        """Cancel the refreshes in flight (clean-up)."""
        tasks = [e.task for e in self._tenants.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _arrays(entry: _Tenant) -> None:
    """Rebuild what requests read of ``entry``'s state: its withdrawn ids and fresh head."""
    entry.withdrawn_ids = np.sort(
        np.fromiter((i for i, item in entry.items.items() if not item.available), np.int64)
    )
    entry.fresh_head = np.fromiter(itertools.islice(reversed(entry.fresh), FRESH_HEAD), np.int64)
    entry.own_ids = np.sort(np.fromiter(entry.fresh, np.int64, count=len(entry.fresh)))


def _members(ids: I64, sorted_set: I64) -> npt.NDArray[np.bool_]:
    """Which of ``ids`` are in ``sorted_set``: a binary search each, so a request pays for
    its own candidates, not for the size of the tenant's catalog."""
    if not sorted_set.size:
        return np.zeros(ids.size, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, ids), sorted_set.size - 1)
    return np.asarray(sorted_set[at] == ids)
