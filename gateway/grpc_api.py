"""``recmesh.gateway.v1.GatewayService``: the gRPC face of the same funnel."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.catalog import CatalogWriter, ItemInput
from gateway.erasure import UserErasure
from gateway.funnel import Funnel
from gateway.metrics import LATENCY, REQUESTS
from gateway.schema import client_events
from mesh.context import API_KEY, budget_var, clamp_deadline, tenant_var
from mesh.errors import RecMeshError, Unavailable
from mesh.tenants import ADMIN, CATALOG, EVENTS, RECOMMEND, Caller, Tenants

DEFAULT_NUM_ITEMS = 10
"""What an unset (0) ``num_items`` means in the gRPC API."""


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Authenticates by the ``x-api-key`` metadata entry and checks its scope for the
    method, then runs the funnel."""

    def __init__(
        self,
        funnel: Funnel,
        tenants: Tenants,
        catalog: CatalogWriter,
        erasure: UserErasure,
        deadline_s: float,
    ) -> None:
        self._funnel = funnel
        self._erasure = erasure
        self._catalog = catalog
        self._tenants = tenants
        self._deadline_s = deadline_s

    def _admit(self, context: Any, scope: str) -> Caller:
        metadata = dict(context.invocation_metadata() or ())
        return self._tenants.admit(str(metadata.get(API_KEY, "")), "metadata", scope)

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: Any
    ) -> gateway_pb2.RecommendResponse:
        started = time.perf_counter()
        code = "OK"
        try:
            tenant = self._admit(context, RECOMMEND).tenant
            budget = budget_var.get()
            deadline = clamp_deadline(
                budget.remaining() if budget else None, self._deadline_s, self._deadline_s
            )
            result = await self._funnel.recommend(
                tenant.name,
                request.user_id,
                request.num_items or DEFAULT_NUM_ITEMS,
                deadline_s=deadline,
            )
        except RecMeshError as exc:
            code = exc.grpc_code.name
            raise
        finally:
            REQUESTS.labels("grpc", "Recommend", tenant_var.get() or "-", code).inc()
            LATENCY.labels("grpc", "Recommend").observe(time.perf_counter() - started)
        return gateway_pb2.RecommendResponse(
            request_id=result.request_id,
            items=[
                gateway_pb2.RecommendedItem(
                    item_id=name,
                    score=score,
                    rank=rank + 1,
                    source=source,  # type: ignore[arg-type]
                    propensity=propensity if request.debug else 0.0,
                )
                for rank, (name, score, source, propensity) in enumerate(
                    zip(
                        result.item_names,
                        result.scores or [0.0] * len(result.item_names),
                        result.sources,
                        result.propensities or [0.0] * len(result.item_names),
                        strict=True,
                    )
                )
            ],
            experiments=[
                gateway_pb2.ExperimentVariant(key=k, variant=v) for k, v in result.experiments
            ],
            degraded=result.degraded,
            stage_ms=result.stage_ms,
            stages=result.stages if request.debug else [],
        )

    async def LogEvents(
        self, request: gateway_pb2.LogEventsRequest, context: Any
    ) -> gateway_pb2.LogEventsResponse:
        self._admit(context, EVENTS)
        events = client_events(list(request.events))
        try:
            await self._funnel.append_events(events)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("events could not be stored; retry later") from exc
        return gateway_pb2.LogEventsResponse(accepted=len(events))

    async def UpsertItems(
        self, request: gateway_pb2.UpsertItemsRequest, context: Any
    ) -> gateway_pb2.CatalogResponse:
        tenant = self._admit(context, CATALOG).tenant
        items = [
            ItemInput(
                ref=item.item_id,
                category=item.category,
                features=list(item.features),
                attributes=dict(item.attributes),
                available=item.available if item.HasField("available") else True,
            )
            for item in request.items
        ]
        try:
            accepted = await self._catalog.upsert(tenant.name, items)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("items could not be stored; retry later") from exc
        return gateway_pb2.CatalogResponse(accepted=accepted)

    async def DeleteItems(
        self, request: gateway_pb2.DeleteItemsRequest, context: Any
    ) -> gateway_pb2.CatalogResponse:
        self._admit(context, CATALOG)
        try:
            accepted = await self._catalog.delete(list(request.item_ids))
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("the deletes could not be stored; retry later") from exc
        return gateway_pb2.CatalogResponse(accepted=accepted)

    async def EraseUser(
        self, request: gateway_pb2.EraseUserRequest, context: Any
    ) -> gateway_pb2.EraseUserResponse:
        """Erase one user of the caller's tenant (``gateway.erasure``); ``admin`` scope."""
        caller = self._admit(context, ADMIN)
        erased = await self._erasure.erase(request.user_id, caller.key.key_id)
        return gateway_pb2.EraseUserResponse(
            status=erased.status,
            subject=erased.subject,
            audit_position=erased.audit_position,
            **erased.counts,
        )
