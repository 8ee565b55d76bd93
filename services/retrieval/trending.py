"""The trending candidate source: each tenant's trending items, kept in the process.

The feature service answers ``GetTrendingItems`` from the projector's trending set (items
by clicks with exponential time decay). Retrieval does not ask it on every request: it
keeps each tenant's list (``size`` items, most decayed clicks first) and refreshes it in
the background.

* **Refresh.** A request that finds its tenant's list at least ``refresh_s`` old (from the
  moment its call was sent) starts one refresh, unless one is in flight or the last one
  started less than ``refresh_s`` ago, and is answered with the list it has. So each
  process calls the feature service at most once per tenant per ``refresh_s``, and only for
  tenants that have traffic.
* **Staleness.** A list is served while it is at most ``max_age_s`` old. Under traffic of a
  request per ``refresh_s`` or more, the list served is at most ``refresh_s`` plus one call
  old; after a quieter spell it may be up to ``max_age_s`` old. A request that finds no list
  it may serve (the tenant's first, after ``max_age_s`` without traffic, or while refreshes
  fail) waits for the refresh, at most ``wait_s``.
* **Failures.** A failed refresh keeps the previous list (served until it is ``max_age_s``
  old) and is retried by the first request ``refresh_s`` after it started. A request with no
  list it may serve gets none and is told why (:attr:`TrendingList.problem`); retrieval then
  names ``trending`` in ``degraded`` and answers from its other sources.

A refresh belongs to every request of its tenant, not to the one that started it: it runs
under its own cap (``refresh_s``) rather than that request's deadline, in a trace of its own
(``retrieval.trending_refresh``), and a request that stops waiting does not cancel it.
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
from mesh.cpu import billed

log = logging.getLogger(__name__)

REFRESHES = Counter(
    "recmesh_retrieval_trending_refreshes_total",
    "Refreshes of a tenant's trending list from the feature service, by outcome (ok, failed)",
    ["tenant", "outcome"],
)

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TrendingList:
    """What a request gets: the tenant's trending items (most decayed clicks first) with
    their decayed clicks as of the refresh, or nothing and why."""

    ids: I64
    clicks: F32
    age_s: float
    """Seconds since the list's call was sent (infinite when there is no list)."""
    problem: str = ""
    """Why no list is served ("" when one is)."""


@dataclass
class _Tenant:
    ids: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    clicks: F32 = field(default_factory=lambda: np.zeros(0, np.float32))
    fetched_at: float = -np.inf
    started_at: float = -np.inf
    error: str = ""
    task: asyncio.Task[None] | None = None


class TrendingCache:
    """Per-tenant trending lists from the feature service (see the module docstring).

    Args:
        features: the feature service, behind the mesh's guards.
        size: items kept per tenant (a request takes its ``trending_k`` plus the items it
            has seen from the head of the list).
        min_clicks: items with fewer decayed clicks are not trending.
        refresh_s: a list this old is refreshed; also the cap of each refresh call.
        max_age_s: a list older than this is not served.
        wait_s: how long a request with no list to serve waits for the refresh.
        clock: monotonic clock (tests inject one).
    """

    def __init__(
        self,
        features: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        *,
        size: int,
        min_clicks: float,
        refresh_s: float,
        max_age_s: float,
        wait_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._features = features
        self._size = size
        self._min_clicks = min_clicks
        self._refresh_s = refresh_s
        self._max_age_s = max_age_s
        self._wait_s = wait_s
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    async def get(self, tenant: str) -> TrendingList:
        """``tenant``'s list, refreshing it as the module docstring says. Never raises for
        a failed refresh: the answer then carries no items and its ``problem``.

        ``tenant`` must be the tenant of the current request context: the refresh names the
        tenant through the call metadata, as every downstream call does.
        """
        entry = self._tenants.setdefault(tenant, _Tenant())
        now = self._clock()
        if (
            entry.task is None
            and now - entry.fetched_at >= self._refresh_s
            and now - entry.started_at >= self._refresh_s
        ):
            self._start(tenant, entry, now)
        if now - entry.fetched_at > self._max_age_s and entry.task is not None:
            # Shielded: a request that stops waiting leaves the refresh to the others.
            await asyncio.wait([asyncio.shield(entry.task)], timeout=self._wait_s)
        age = self._clock() - entry.fetched_at
        if age <= self._max_age_s:
            return TrendingList(entry.ids, entry.clicks, age)
        if entry.error:
            why = f"trending unavailable: {entry.error}"
        elif entry.task is not None:
            why = f"trending list not refreshed within {self._wait_s * 1000:.0f} ms"
        else:
            why = "trending list too old"
        return TrendingList(np.zeros(0, np.int64), np.zeros(0, np.float32), age, why)

    def _start(self, tenant: str, entry: _Tenant, now: float) -> None:
        entry.started_at = now
        entry.task = asyncio.create_task(
            billed(tenant, self._refresh(tenant, entry)), context=detached()
        )

    async def _refresh(self, tenant: str, entry: _Tenant) -> None:
        """One ``GetTrendingItems`` call; its answer (or why it failed) goes to ``entry``."""
        sent = self._clock()
        features = self._features
        try:
            with tracing.tracer.start_as_current_span(
                "retrieval.trending_refresh",
                context=tracing.ROOT,
                attributes=tracing.recmesh_attributes(tenant=tenant),
            ):
                reply: feature_pb2.GetTrendingItemsResponse = await features.call(
                    features.stub.GetTrendingItems,
                    feature_pb2.GetTrendingItemsRequest(k=self._size, min_clicks=self._min_clicks),
                    cap_s=self._refresh_s,
                    idempotent=True,
                )
            entry.ids = np.asarray(reply.item_ids, dtype=np.int64)
            entry.clicks = np.asarray(reply.clicks, dtype=np.float32)
            entry.fetched_at = sent
            entry.error = ""
            REFRESHES.labels(tenant, "ok").inc()
        except CALL_FAILURES as exc:
            entry.error = describe_failure(exc)
            REFRESHES.labels(tenant, "failed").inc()
            log.warning("trending items of %s not refreshed: %s", tenant, entry.error)
        except Exception as exc:  # a bug must not fail the requests that wait for the list
            entry.error = describe_failure(exc)
            REFRESHES.labels(tenant, "failed").inc()
            log.exception("trending items of %s not refreshed", tenant)
        finally:
            entry.task = None

    async def idle(self) -> None:
        """Wait until no refresh is in flight (each ends within its cap, ``refresh_s``)."""
        while tasks := [entry.task for entry in self._tenants.values() if entry.task is not None]:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        """Cancel the refreshes in flight (clean-up)."""
        tasks = [entry.task for entry in self._tenants.values() if entry.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
