"""Which items' rows must be read from the feature service rather than the served set.

Ranking scores the items of its artifact set with the set's own item rows
(:attr:`RankingModels.item_features <services.ranking.models.RankingModels>`), held in
the process: no call on the request path, and a hot swap changes models and rows together.
A tenant may overwrite an item's row in the feature store (``WriteItemFeatures``); the
feature service records each such write (``GetItemChanges``), and those items are read
through the feature service (and the item cache) as before. Per tenant:

* **First request.** Until the tenant's changes were read once, no set row is trusted: the
  first request starts the read and waits for it within its item-features budget
  (concurrent first requests share the one read); if it fails or is late, the request reads
  every row through the feature service, as before, and a later request tries again.
* **Refresh.** Then a request starts a background read of the changes since the last
  one when ``refresh_s`` has passed since the last started: under traffic a row written
  through the feature service is scored by ranking within about ``refresh_s`` plus a call
  (after an idle spell, one request may still use the row held before). Every item a read
  returns is dropped from the item cache (:meth:`ItemFeatureCache.forget
  <services.ranking.item_cache.ItemFeatureCache.forget>`), so a row cached before a write
  (the first or a later one) is not served after it.
* **Failures** of a refresh keep what is known (a write made meanwhile is not seen until a
  refresh succeeds; counted in ``recmesh_ranking_item_change_reads_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh import tracing
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.context import detached
from mesh.cpu import billed

log = logging.getLogger(__name__)

READS = Counter(
    "recmesh_ranking_item_change_reads_total",
    "Reads of the tenants' item changes from the feature service, by tenant and outcome",
    ["tenant", "outcome"],
)

I64 = npt.NDArray[np.int64]

OVERLAP_MS = 5000
"""How far before the latest change each read starts again: writes are scored by the
writer's clock, so one may land after a later-scored write was read; items read again are
not new, but their cached rows are dropped again (:meth:`ItemChanges._read`)."""


@dataclass
class _Tenant:
    changed: I64 | None = None
    """Items written through the feature service, sorted; None until read once."""
    since_ms: int = 0
    task: asyncio.Task[None] | None = None
    started_at: float = -np.inf


class ItemChanges:
    """The items of each tenant whose rows come from the feature service (module docstring).

    Args:
        features: the feature service, behind the mesh's guards.
        refresh_s: how often a tenant's changes are read again (also each read's cap).
        forget: called with (tenant, item ids) for every item newly learnt as changed.
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        *,
        refresh_s: float,
        forget: Callable[[str, list[int]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._features = features
        self._refresh_s = refresh_s
        self._forget = forget
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    async def changed(self, tenant: str, cap_s: float) -> I64 | None:
        """The tenant's changed items (sorted), or None when they could not be read yet.

        Until the tenant's changes were read once, a call waits up to ``cap_s`` for the one
        read in flight (the first caller starts it; concurrent first requests share it);
        later calls never wait and start a background refresh every ``refresh_s``.
        ``tenant`` must be the tenant of the current request context (the read names it
        through the call metadata).
        """
        state = self._tenants.setdefault(tenant, _Tenant())
        if state.changed is None:
            if cap_s <= 0:
                return None
            if state.task is None:
                state.started_at = self._clock()
                state.task = asyncio.create_task(
                    billed(tenant, self._refresh(tenant, state)), context=detached()
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(state.task), cap_s)
            return state.changed
        now = self._clock()
        if state.task is None and now - state.started_at >= self._refresh_s:
            state.started_at = now
            state.task = asyncio.create_task(
                billed(tenant, self._refresh(tenant, state)), context=detached()
            )
        return state.changed

    async def _refresh(self, tenant: str, state: _Tenant) -> None:
        try:
            with tracing.tracer.start_as_current_span(
                "ranking.item_changes_read",
                context=tracing.ROOT,
                attributes=tracing.recmesh_attributes(tenant=tenant),
            ):
                await self._read(tenant, state, self._refresh_s)
        finally:
            state.task = None

    async def _read(self, tenant: str, state: _Tenant, cap_s: float) -> None:
        features = self._features
        try:
            reply: feature_pb2.GetItemChangesResponse = await features.call(
                features.stub.GetItemChanges,
                feature_pb2.GetItemChangesRequest(since_ms=state.since_ms),
                cap_s=cap_s,
                idempotent=True,
            )
        except CALL_FAILURES as exc:
            READS.labels(tenant, "failed").inc()
            log.warning("item changes of %s not read: %s", tenant, describe_failure(exc))
            return
        written = list(reply.item_ids)
        if written:
            self._forget(tenant, written)  # rewritten items too: their cached rows are old
        known = state.changed if state.changed is not None else np.zeros(0, dtype=np.int64)
        new = np.setdiff1d(np.asarray(written, dtype=np.int64), known)
        if new.size or state.changed is None:
            state.changed = np.union1d(known, new).astype(np.int64)
        # Read again from OVERLAP_MS before the latest change: a write scored by its writer's
        # clock may land after a later-scored one was read (the window of the race).
        state.since_ms = max(0, reply.as_of_ms - OVERLAP_MS)
        READS.labels(tenant, "ok").inc()

    async def close(self) -> None:
        """Cancel the reads in flight (clean-up)."""
        tasks = [s.task for s in self._tenants.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
