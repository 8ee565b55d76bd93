"""The retrieval fallback: each tenant's popular items, kept warm in the background.

When retrieval is down the funnel answers from here (named ``retrieval`` in
``degraded``). The cache is filled at start-up and refreshed every ``refresh_s`` by asking
retrieval for a user nobody has (which returns the tenant's popularity list, only
servable items, with the tenant's own ids of its own items), so it exists before the first
failure and follows the catalogue as it changes.

An item withdrawn since (deleted, or upserted as unavailable) must not be served from the
cache either: retrieval's bar, 1 s, holds here too. So when the cache is used, the items
changed since its list was read (:data:`OVERLAP_MS` before, the writers' clocks may differ)
are read from the feature service (``GetItemChanges`` with their availability) unless that
was done in the last ``recheck_s``, and the withdrawn ones are left out. A failed check
serves the list minus what the last check found (the answer is degraded already).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from recmesh.common.v1 import common_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from mesh.client import Downstream, describe_failure
from mesh.context import detached, tenant_var

log = logging.getLogger(__name__)

PROBE_USER = "__recmesh_popular__"
"""A user id no tenant has: retrieval answers it with popular items only."""

OVERLAP_MS = 5_000
"""How far before a list's read its withdrawn check starts: a change is scored by the
projector's Redis clock, the list's read time by this process's."""

CHECK_CAP_S = 0.05
"""The longest a withdrawn check may hold a request that is served from the cache."""

CHECK_PAGES = 10
"""Most pages of 1,000 changes one check reads; a longer backlog is read by the next."""


@dataclass
class _Cached:
    """One tenant's list and what is known withdrawn of it."""

    answer: retrieval_pb2.RetrieveResponse
    read_ms: int
    """Wall time (ms) the list was read at: changes from before it are in it."""
    withdrawn: set[int] = field(default_factory=set)
    checked_at: float = float("-inf")
    """Monotonic time of the last successful withdrawn check."""
    since_ms: int = 0
    """Where the next check reads changes from."""
    check: asyncio.Task[None] | None = None


class PopularFallback:
    """Popular candidates per tenant, refreshed from the retrieval service.

    Args:
        retrieval: the guarded retrieval downstream.
        feature: the feature service, asked which items changed (withdrawn checks).
        tenants: tenants to keep a list for.
        size: items kept per tenant.
        refresh_s: seconds between refreshes.
        recheck_s: how old a withdrawn check may be when the cache is used.
        clock: monotonic seconds; ``wall_ms`` wall time in ms (tests pass their own).
    """

    def __init__(
        self,
        retrieval: Downstream[retrieval_pb2_grpc.RetrievalServiceAsyncStub],
        feature: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        tenants: Sequence[str],
        size: int = 200,
        refresh_s: float = 30.0,
        recheck_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._retrieval = retrieval
        self._feature = feature
        self._tenants = list(tenants)
        self._size = size
        self._refresh_s = refresh_s
        self._recheck_s = recheck_s
        self._clock = clock
        self._wall_ms = wall_ms
        self._lists: dict[str, _Cached] = {}
        self._task: asyncio.Task[None] | None = None

    async def get(self, tenant: str) -> retrieval_pb2.RetrieveResponse | None:
        """The tenant's cached answer (sources marked ``SOURCE_FALLBACK``) without the items
        withdrawn since it was read, if there is one. ``tenant`` must be the current
        request's (the check calls in its name); never raises."""
        cached = self._lists.get(tenant)
        if cached is None:
            return None
        if self._clock() - cached.checked_at > self._recheck_s:
            if cached.check is None or cached.check.done():
                cached.check = asyncio.create_task(self._check(cached))
            try:
                await asyncio.wait_for(asyncio.shield(cached.check), CHECK_CAP_S)
            except TimeoutError:
                log.warning("withdrawn check of the popular fallback is late for %s", tenant)
        return _without(cached.answer, cached.withdrawn)

    async def _check(self, cached: _Cached) -> None:
        """Read the changes since ``cached.since_ms`` and update ``cached.withdrawn``."""
        try:
            for _ in range(CHECK_PAGES):
                reply = await self._feature.call(
                    self._feature.stub.GetItemChanges,
                    feature_pb2.GetItemChangesRequest(
                        since_ms=cached.since_ms, with_state=True, limit=1000
                    ),
                    cap_s=1.0,
                    idempotent=True,
                )
                for item, available in zip(reply.item_ids, reply.available, strict=True):
                    if available:
                        cached.withdrawn.discard(item)
                    else:
                        cached.withdrawn.add(item)
                if not reply.more:
                    cached.since_ms = max(cached.since_ms, reply.as_of_ms)
                    break
                cached.since_ms = max(cached.since_ms, reply.as_of_ms + 1)
            cached.checked_at = self._clock()
        except Exception as exc:
            log.warning("withdrawn check of the popular fallback failed: %s", describe_failure(exc))

    async def refresh_once(self) -> None:
        """Refresh every tenant's list; a tenant whose refresh fails keeps its old list."""
        for tenant in self._tenants:
            tenant_var.set(tenant)
            read_ms = self._wall_ms()
            try:
                reply = await self._retrieval.call(
                    self._retrieval.stub.Retrieve,
                    retrieval_pb2.RetrieveRequest(user_id=PROBE_USER, popular_k=self._size),
                    cap_s=1.0,
                    idempotent=True,
                )
            except Exception as exc:
                log.warning(
                    "popular fallback not refreshed for %s: %s", tenant, describe_failure(exc)
                )
                continue
            ids = list(reply.candidates.item_ids)
            answer = retrieval_pb2.RetrieveResponse(
                candidates=common_pb2.Candidates(
                    item_ids=ids,
                    scores=list(reply.candidates.scores),
                    sources=[common_pb2.SOURCE_FALLBACK] * len(ids),
                ),
                names={i: reply.names[i] for i in ids if i in reply.names},
            )
            self._lists[tenant] = _Cached(answer, read_ms, since_ms=read_ms - OVERLAP_MS)

    async def _loop(self) -> None:
        while True:
            await self.refresh_once()
            await asyncio.sleep(self._refresh_s)

    async def start(self) -> None:
        """Fill the cache once (best effort), then keep refreshing in the background. Both
        run in tasks of their own context: the tenant each refresh names never leaks into
        the caller's (the start-up context every request of the HTTP server inherits)."""
        await asyncio.create_task(self.refresh_once(), context=detached())
        self._task = asyncio.create_task(self._loop(), context=detached())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _without(
    answer: retrieval_pb2.RetrieveResponse, withdrawn: set[int]
) -> retrieval_pb2.RetrieveResponse:
    """``answer`` without the ``withdrawn`` items (``answer`` itself when none of them)."""
    candidates = answer.candidates
    keep = [i for i, item in enumerate(candidates.item_ids) if item not in withdrawn]
    if len(keep) == len(candidates.item_ids):
        return answer
    ids = [candidates.item_ids[i] for i in keep]
    return retrieval_pb2.RetrieveResponse(
        candidates=common_pb2.Candidates(
            item_ids=ids,
            scores=[candidates.scores[i] for i in keep],
            sources=[candidates.sources[i] for i in keep],
        ),
        names={i: answer.names[i] for i in ids if i in answer.names},
    )
