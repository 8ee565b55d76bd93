"""Items' recent counters for re-rank, kept in the process and refreshed off the request path.

Re-rank weighs each pool item's recent click-through rate (decayed clicks over decayed
impressions, from the event log: the projector's item counters, read through the feature
service's ``GetItemFeatures`` with ``counter_item_ids``). Reading them on every request
would add a call to the feature service to every ranking request, the most expensive
thing a request does in this mesh (about 1.5 ms of CPU per call, client and server, see
``docs/performance.md``). So ranking keeps them here, per ``(tenant, item)``:

* **Lookup, never a wait.** A request takes the counters held for its pool's items.
  Items held for less than ``max_age_s`` are served; the others (new to this process, or
  too old) count as unknown for this request, a lift of 0 (:func:`~services.ranking.rerank
  .ctr_lift` of no counts).
* **Refresh.** Items found missing or at least ``refresh_s`` old are queued. A lookup
  starts a fetch of the tenant's whole queue (one call, at most ``batch`` ids; the rest wait
  for the next) when none is in flight and the last one started at least ``refresh_s``
  ago: at most one call per tenant per ``refresh_s``, whatever the request rate. So under
  steady traffic the counters served are at most twice ``refresh_s`` plus one call old, and
  an item new to the process is ranked without them for up to ``refresh_s`` plus a call.
* **Failures.** A failed fetch leaves what is held (served until ``max_age_s`` old) and
  queues its ids again for the next fetch, ``refresh_s`` later. While the tenant's last
  fetch failed, a lookup that lacks counters for some item says why (:attr:`Held.problem`):
  the stage is named in ``degraded``.
* **Size.** At most ``max_entries`` items in all; holding one more evicts the least
  recently used.

A fetch belongs to all the tenant's requests: it runs under its own cap (``refresh_s``),
not under the deadline of the request that queued it, in a trace of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh import tracing
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.context import detached
from mesh.cpu import billed

log = logging.getLogger(__name__)

FETCHES = Counter(
    "recmesh_ranking_counter_fetches_total",
    "Fetches of item counters from the feature service, by tenant and outcome (ok, failed)",
    ["tenant", "outcome"],
)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

FETCH_FAILURES: tuple[type[Exception], ...] = (*CALL_FAILURES, ValueError)
"""A failed call, or an answer without one counter per item asked for."""


@dataclass(frozen=True)
class Held:
    """The counters held for a batch of items, in its order (0 where ``known`` is False)."""

    clicks: F64
    impressions: F64
    known: npt.NDArray[np.bool_]
    problem: str = ""
    """Why some items have no counters: the tenant's last fetch failed ("" otherwise)."""


@dataclass
class _Tenant:
    queued: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    started_at: float = -np.inf
    error: str = ""


class CounterCache:
    """Per-item counters of every tenant, refreshed in the background (module docstring).

    Args:
        features: the feature service, behind the mesh's guards.
        refresh_s: counters this old are fetched again; also the cap of each fetch.
        max_age_s: counters older than this are not served.
        max_entries: items held in all (least recently used evicted).
        batch: most ids one fetch asks for (the feature service's batch limit).
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        *,
        refresh_s: float,
        max_age_s: float,
        max_entries: int,
        batch: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._features = features
        self._refresh_s = refresh_s
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._batch = batch
        self._clock = clock
        self._held: OrderedDict[tuple[str, int], tuple[float, float, float]] = OrderedDict()
        """(tenant, item) -> (clicks, impressions, when their fetch was sent)."""
        self._tenants: dict[str, _Tenant] = {}

    def __len__(self) -> int:
        return len(self._held)

    def lookup(self, tenant: str, ids: I64) -> Held:
        """The counters held for ``ids`` of ``tenant``; queues (and starts fetching) those
        missing or due for a refresh. Never waits.

        ``tenant`` must be the tenant of the current request context: the fetch names the
        tenant through the call metadata, as every downstream call does.
        """
        now = self._clock()
        state = self._tenants.setdefault(tenant, _Tenant())
        clicks = np.zeros(ids.size, dtype=np.float64)
        impressions = np.zeros(ids.size, dtype=np.float64)
        known = np.zeros(ids.size, dtype=bool)
        held = self._held
        for position, item in enumerate(ids.tolist()):
            key = (tenant, item)
            entry = held.get(key)
            if entry is not None and now - entry[2] <= self._max_age_s:
                clicks[position], impressions[position] = entry[0], entry[1]
                known[position] = True
                held.move_to_end(key)
            if entry is None or now - entry[2] >= self._refresh_s:
                state.queued.add(item)
        if state.queued and state.task is None and now - state.started_at >= self._refresh_s:
            state.started_at = now
            state.task = asyncio.create_task(
                billed(tenant, self._fetch(tenant, state)), context=detached()
            )
        problem = state.error if state.error and not known.all() else ""
        return Held(clicks, impressions, known, problem)

    async def _fetch(self, tenant: str, state: _Tenant) -> None:
        """One call for (up to ``batch`` of) the tenant's queued ids."""
        ids = list(state.queued)[: self._batch]
        state.queued.difference_update(ids)
        sent = self._clock()
        features = self._features
        try:
            with tracing.tracer.start_as_current_span(
                "ranking.counters_fetch",
                context=tracing.ROOT,
                attributes=tracing.recmesh_attributes(tenant=tenant, items=len(ids)),
            ):
                reply: feature_pb2.GetItemFeaturesResponse = await features.call(
                    features.stub.GetItemFeatures,
                    feature_pb2.GetItemFeaturesRequest(counter_item_ids=ids),
                    cap_s=self._refresh_s,
                    idempotent=True,
                )
            found = reply.counters
            if len(found.clicks) != len(ids):
                raise ValueError(f"{len(found.clicks)} counters for {len(ids)} items")
            for item, clicks, impressions in zip(ids, found.clicks, found.impressions, strict=True):
                key = (tenant, item)
                self._held[key] = (clicks, impressions, sent)
                self._held.move_to_end(key)
            while len(self._held) > self._max_entries:
                self._held.popitem(last=False)
            state.error = ""
            FETCHES.labels(tenant, "ok").inc()
        except FETCH_FAILURES as exc:
            state.queued.update(ids)
            state.error = describe_failure(exc)
            FETCHES.labels(tenant, "failed").inc()
            log.warning("item counters of %s not fetched: %s", tenant, state.error)
        finally:
            state.task = None

    async def idle(self) -> None:
        """Wait until no fetch is in flight (each ends within its cap, ``refresh_s``)."""
        while tasks := [s.task for s in self._tenants.values() if s.task is not None]:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        """Cancel the fetches in flight (clean-up)."""
        tasks = [s.task for s in self._tenants.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
