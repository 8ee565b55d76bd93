"""The retrieval fallback: each tenant's popular items, kept warm in the background.

When retrieval is down the funnel answers from here (named ``retrieval`` in
``degraded``). The cache is filled at start-up and refreshed every ``refresh_s`` by asking
retrieval for a user nobody has (which returns the tenant's popularity list), so it exists
before the first failure and follows the catalogue as it changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from recmesh.common.v1 import common_pb2
from recmesh.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from mesh.client import Downstream, describe_failure
from mesh.context import tenant_var

log = logging.getLogger(__name__)

PROBE_USER = "__recmesh_popular__"
"""A user id no tenant has: retrieval answers it with popular items only."""


class PopularFallback:
    """Popular candidates per tenant, refreshed from the retrieval service.

    Args:
        retrieval: the guarded retrieval downstream.
        tenants: tenants to keep a list for.
        size: items kept per tenant.
        refresh_s: seconds between refreshes.
    """

    def __init__(
        self,
        retrieval: Downstream[retrieval_pb2_grpc.RetrievalServiceAsyncStub],
        tenants: Sequence[str],
        size: int = 200,
        refresh_s: float = 30.0,
    ) -> None:
        self._retrieval = retrieval
        self._tenants = list(tenants)
        self._size = size
        self._refresh_s = refresh_s
        self._lists: dict[str, common_pb2.Candidates] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self, tenant: str) -> common_pb2.Candidates | None:
        """The tenant's cached list (sources marked ``SOURCE_FALLBACK``), if any."""
        return self._lists.get(tenant)

    async def refresh_once(self) -> None:
        """Refresh every tenant's list; a tenant whose refresh fails keeps its old list."""
        for tenant in self._tenants:
            tenant_var.set(tenant)
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
            self._lists[tenant] = common_pb2.Candidates(
                item_ids=ids,
                scores=list(reply.candidates.scores),
                sources=[common_pb2.SOURCE_FALLBACK] * len(ids),
            )

    async def _loop(self) -> None:
        while True:
            await self.refresh_once()
            await asyncio.sleep(self._refresh_s)

    async def start(self) -> None:
        """Fill the cache once (best effort), then keep refreshing in the background."""
        await self.refresh_once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
