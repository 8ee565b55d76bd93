"""Which items' rows must be read from the feature service rather than the served set.

Ranking scores the items of its artifact set with the set's own item rows
(:attr:`RankingModels.item_features <services.ranking.models.RankingModels>`), held in
the process: no call on the request path, and a hot swap changes models and rows together.
A tenant may overwrite an item's row in the feature store (``WriteItemFeatures``); the
feature service records each such write (``GetItemChanges``), and those items are read
through the feature service (and the item cache) as before. Per tenant:

* **First request.** Until the tenant's changes were read once, no set row is trusted: the
  first request reads them, inline, within its item-features budget (one small call per
  tenant per process); if that fails, the request reads every row through the feature
  service, as before, and the next request tries again.
* **Refresh.** Then a lookup starts a background read of the changes since the last one
  when ``refresh_s`` has passed since the last started: a row written through the feature
  service is scored by ranking within about ``refresh_s`` plus a call. Each changed item is
  dropped from the item cache (:meth:`ItemFeatureCache.forget
  <services.ranking.item_cache.ItemFeatureCache.forget>`) when it is learnt, so a row
  cached before the write is not served after it.
* **Failures** of a refresh keep what is known (a write made meanwhile is not seen until a
  refresh succeeds; counted in ``recmesh_ranking_item_change_reads_total``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh import tracing
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.context import detached

log = logging.getLogger(__name__)

READS = Counter(
    "recmesh_ranking_item_change_reads_total",
    "Reads of the tenants' item changes from the feature service, by tenant and outcome",
    ["tenant", "outcome"],
)

I64 = npt.NDArray[np.int64]


@dataclass
class _Tenant:
    changed: I64 | None = None
    """Items written through the feature service, sorted; None until read once."""
    since_ms: int = 0
    task: asyncio.Task[None] | None = None
    started_at: float = -np.inf
    seen: set[int] = field(default_factory=set)


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

        The tenant's first call reads them inline within ``cap_s``; later calls never wait
        and start a background refresh every ``refresh_s``. ``tenant`` must be the tenant
        of the current request context (the read names it through the call metadata).
        """
        state = self._tenants.setdefault(tenant, _Tenant())
        if state.changed is None:
            if cap_s > 0 and state.task is None:
                state.started_at = self._clock()
                await self._read(tenant, state, cap_s)
            return state.changed
        now = self._clock()
        if state.task is None and now - state.started_at >= self._refresh_s:
            state.started_at = now
            state.task = asyncio.create_task(self._refresh(tenant, state), context=detached())
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
        new = [item for item in reply.item_ids if item not in state.seen]
        if new:
            state.seen.update(new)
            self._forget(tenant, new)
        if new or state.changed is None:
            state.changed = np.array(sorted(state.seen), dtype=np.int64)
        state.since_ms = reply.as_of_ms
        READS.labels(tenant, "ok").inc()

    async def close(self) -> None:
        """Cancel the reads in flight (clean-up)."""
        tasks = [s.task for s in self._tenants.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
