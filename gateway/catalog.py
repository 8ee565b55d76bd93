"""The live catalog's write API (``PUT /v1/items``, ``DELETE /v1/items/{id}`` and their gRPC
twins): items checked against the tenant's item view, then written to the log as catalog
events through the outbox, like clients' events (accepted once stored: nothing is lost
when the event logger is down). The projector applies them in log order
(``services.projector``); retrieval serves them (``services.retrieval.catalog``).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from recmesh.events.v1 import events_pb2
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from core.catalog import (
    check_attributes,
    check_batch_size,
    check_features,
    check_ref,
    delete_event,
    upsert_event,
)
from mesh.client import CALL_FAILURES, Downstream, describe_failure
from mesh.context import tenant_var
from mesh.errors import InvalidArgument, Unavailable

WIDTH_TTL_S = 60.0
"""How long the gateway trusts a tenant's item feature width before asking again."""


@dataclass(frozen=True)
class ItemInput:
    """One item of an upsert, as either API parsed it (not yet checked)."""

    ref: str
    category: int
    features: Sequence[float]
    attributes: Mapping[str, str] = field(default_factory=dict)
    available: bool = True


class CatalogWriter:
    """Checks catalog writes of the current tenant and hands them to ``append``.

    Args:
        feature: the feature service, asked for the tenant's item feature width
            (``DescribeViews``, cached :data:`WIDTH_TTL_S`).
        append: stores a batch of the current tenant's events (the funnel's outbox path).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        feature: Downstream[feature_pb2_grpc.FeatureServiceAsyncStub],
        append: Callable[[list[events_pb2.Event]], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._feature = feature
        self._append = append
        self._clock = clock
        self._widths: dict[str, tuple[int, float]] = {}

    async def item_width(self, tenant: str) -> int:
        """The tenant's item feature width.

        Raises:
            Unavailable: the feature service cannot say (down, or nothing materialised).
        """
        cached = self._widths.get(tenant)
        if cached is not None and self._clock() - cached[1] < WIDTH_TTL_S:
            return cached[0]
        try:
            reply = await self._feature.call(
                self._feature.stub.DescribeViews,
                feature_pb2.DescribeViewsRequest(),
                cap_s=1.0,
                idempotent=True,
            )
        except CALL_FAILURES as exc:
            raise Unavailable(
                f"the item feature width is unknown ({describe_failure(exc)}); retry later"
            ) from exc
        width = next((v.dim for v in reply.views if v.name == "item"), 0)
        if width <= 0:
            raise Unavailable("the tenant has no item view materialised yet; retry later")
        self._widths[tenant] = (width, self._clock())
        return width

    async def common_width(self, tenants: Iterable[str]) -> int | None:
        """The item feature width every tenant of ``tenants`` has (what ``GET /openapi.json``
        states), or None when one is unknown or two differ. Each tenant's is asked under
        that tenant (the call's metadata), and cached like :meth:`item_width`."""
        widths = set()
        for tenant in tenants:
            context = contextvars.copy_context()
            context.run(tenant_var.set, tenant)
            try:
                widths.add(await asyncio.create_task(self.item_width(tenant), context=context))
            except Unavailable:
                return None
        return widths.pop() if len(widths) == 1 else None

    async def upsert(self, tenant: str, items: Sequence[ItemInput]) -> int:
        """Write ``items`` as ``item_upsert`` events; the count accepted.

        Raises:
            InvalidArgument: no items, more than ``MAX_ITEMS_PER_CALL``, or an item with a
                bad id, a negative category, features that are not the tenant's width of
                finite numbers, or too many or too long attributes (``items[i].<field>``).
            Unavailable: the item width is unknown, or the outbox cannot store them.
            ResourceExhausted: the outbox is full (retry after ``Retry-After``).
        """
        check_batch_size(len(items), "items")
        width = await self.item_width(tenant)
        now_ms = int(time.time() * 1000)
        events = []
        for index, item in enumerate(items):
            prefix = f"items[{index}]"
            check_ref(item.ref, f"{prefix}.item_id")
            if item.category < 0:
                raise InvalidArgument("category must be >= 0", field=f"{prefix}.category")
            packed = check_features(item.features, width, f"{prefix}.features")
            check_attributes(item.attributes, f"{prefix}.attributes")
            events.append(
                upsert_event(
                    item.ref, item.category, packed, item.attributes, item.available, now_ms
                )
            )
        await self._append(events)
        return len(events)

    async def delete(self, refs: Sequence[str]) -> int:
        """Write ``item_delete`` events for ``refs``; the count accepted.

        Raises:
            InvalidArgument: no ids, more than ``MAX_ITEMS_PER_CALL``, or a bad id.
            Unavailable / ResourceExhausted: as :meth:`upsert`.
        """
        check_batch_size(len(refs), "item_ids")
        now_ms = int(time.time() * 1000)
        events = [
            delete_event(check_ref(ref, f"item_ids[{index}]"), now_ms)
            for index, ref in enumerate(refs)
        ]
        await self._append(events)
        return len(events)
