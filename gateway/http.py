"""The HTTP/JSON API (aiohttp) on the same event loop as the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from recmesh.common.v1 import common_pb2

from gateway.catalog import CatalogWriter
from gateway.clients import Downstreams
from gateway.erasure import UserErasure
from gateway.funnel import Funnel, Recommendation
from gateway.metrics import LATENCY, REFUSALS, REQUESTS
from gateway.openapi import openapi_document
from gateway.reports import ExperimentReports
from gateway.schema import (
    client_events,
    client_request_id,
    parse_events,
    parse_items,
    parse_recommend,
    request_params,
)
from mesh import tracing
from mesh.context import API_KEY, REQUEST_ID_KEY, tenant_var
from mesh.errors import Overloaded, RecMeshError, ResourceExhausted, Unavailable
from mesh.telemetry import metrics_response
from mesh.tenants import ADMIN, CATALOG, EVENTS, RECOMMEND, Caller, Tenants

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

WIDTH_WAIT_S = 0.25
"""Longest ``GET /openapi.json`` waits for the tenants' item feature width."""


def _source_name(source: int) -> str:
    return common_pb2.Source.Name(source).removeprefix("SOURCE_").lower()  # type: ignore[arg-type]


def render(result: Recommendation, debug: bool) -> dict[str, Any]:
    """The JSON body of a recommendation, as the brief fixes it.

    With ``debug`` it also explains each stage (time, budget, candidates in/out, whether
    and why it degraded, stage-specific ``details``) and gives each item the propensity
    ranking's policy had of showing it (absent when ranking did not answer).
    """
    body: dict[str, Any] = {
        "request_id": result.request_id,
        "items": [
            {
                "item_id": name,
                "score": round(score, 6),
                "rank": rank + 1,
                "source": _source_name(src),
            }
            for rank, (name, score, src) in enumerate(
                zip(
                    result.item_names,
                    result.scores or [0.0] * len(result.item_ids),
                    result.sources,
                    strict=True,
                )
            )
        ],
        "experiments": [{"key": key, "variant": variant} for key, variant in result.experiments],
        "degraded": result.degraded,
        "stage_ms": {stage: round(ms, 3) for stage, ms in result.stage_ms.items()},
    }
    if debug:
        body["stages"] = [
            {
                "stage": s.stage,
                "elapsed_ms": round(s.elapsed_ms, 3),
                "budget_ms": round(s.budget_ms, 3),
                "candidates_in": s.candidates_in,
                "candidates_out": s.candidates_out,
                "degraded": s.degraded,
                "reason": s.reason,
                "details": {key: round(value, 6) for key, value in s.details.items()},
            }
            for s in result.stages
        ]
        for item, propensity in zip(body["items"], result.propensities, strict=False):
            item["propensity"] = round(propensity, 6)
    return body


def _error_response(exc: RecMeshError) -> web.Response:
    headers = {}
    if isinstance(exc, ResourceExhausted | Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return web.json_response(exc.to_dict(), status=exc.http_status, headers=headers)


def _slow_body(timeout_s: float) -> web.Response:
    """408 for a body that did not arrive within ``timeout_s``; the connection is closed."""
    response = web.json_response(
        {
            "error": "DEADLINE_EXCEEDED",
            "message": f"the request body did not arrive within {timeout_s:g} s",
            "field": "body",
        },
        status=408,
    )
    response.force_close()
    return response


class HttpApi:
    """Routes of the public HTTP API.

    Once :meth:`drain` was awaited the API keeps answering every request as before, but
    with ``Connection: close``, and ``/healthz`` reports 503.
    """

    _body_timeout_s = 10.0

    def __init__(
        self,
        funnel: Funnel,
        tenants: Tenants,
        downstreams: Downstreams,
        reports: ExperimentReports,
        catalog: CatalogWriter,
        erasure: UserErasure,
        *,
        max_items: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # max_items and clock bound what requests may hold (gateway.schema.request_params):
        # the largest num_items, the window of event times (tests pass a fixed clock).
        self._max_items = max_items
        self._clock = clock
        self._funnel = funnel
        self._erasure = erasure
        self._catalog = catalog
        self._tenants = tenants
        self._downstreams = downstreams
        self._reports = reports
        self._draining = False

    async def drain(self) -> None:
        """Close every connection after its next response from now on (a drain hook).

        Keep-alive clients then open a new connection per request instead of sending one
        on an idle connection just as the listener closes it; once the listener is gone
        they are refused, not reset mid-request.
        """
        self._draining = True

    def _admit(self, request: web.Request, scope: str) -> Caller:
        """The request's key, checked for ``scope`` (``mesh.tenants``, the scopes' table
        in ``docs/security.md``); its tenant becomes the request's."""
        return self._tenants.admit(request.headers.get(API_KEY, ""), "header", scope)

    def app(self, max_body_bytes: int, body_timeout_s: float = 10.0) -> web.Application:
        """The routes; a body larger than ``max_body_bytes`` is answered 413, one that takes
        longer than ``body_timeout_s`` to arrive 408 (its connection is closed)."""
        self._body_timeout_s = body_timeout_s
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._observe])
        app.on_response_prepare.append(self._close_while_draining)
        app.add_routes(
            [
                web.post("/v1/recommend", self.recommend),
                web.post("/v1/events", self.events),
                web.put("/v1/items", self.upsert_items),
                web.delete("/v1/items/{id}", self.delete_item),
                web.get("/v1/experiments/{key}/report", self.report),
                web.delete("/v1/users/{user_id}", self.erase_user),
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.get("/openapi.json", self.openapi),
            ]
        )
        return app

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        # No tenant until the request's key says which: nothing set where the listener
        # started (or on the connection) may label a request refused before that.
        tenant_var.set("")
        route = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "other"
        )
        span_of_request = (
            tracing.http_server_span(request.method, route, request.headers, request.path)
            if request.path.startswith("/v1/")  # the API; health, metrics, docs are not traced
            else contextlib.nullcontext(tracing.NO_SPAN)
        )
        with span_of_request as span:
            response: web.StreamResponse
            try:
                if not await self._body_in_time(request):
                    response = _slow_body(self._body_timeout_s)
                else:
                    response = await handler(request)
            except RecMeshError as exc:
                response = _error_response(exc)
            except web.HTTPRequestEntityTooLarge:
                response = web.json_response(
                    {"error": "INVALID_ARGUMENT", "message": "body too large", "field": "body"},
                    status=413,
                )
            tracing.end_http(span, response.status)
        elapsed = time.perf_counter() - started
        REQUESTS.labels("http", route, tenant_var.get() or "-", str(response.status)).inc()
        LATENCY.labels("http", route).observe(elapsed, tracing.exemplar(span))
        if response.status in (429, 503):
            REFUSALS.labels("http", str(response.status)).observe(elapsed)
        return response

    async def _body_in_time(self, request: web.Request) -> bool:
        """Read the request's body (aiohttp keeps it for the handler's ``read()``) within
        the body timeout; False when it did not arrive in time.

        Raises:
            web.HTTPRequestEntityTooLarge: the body is over the size limit.
        """
        if not request.body_exists:
            return True
        try:
            async with asyncio.timeout(self._body_timeout_s):
                await request.read()
        except TimeoutError:
            return False
        return True

    async def _close_while_draining(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        # A signal, not a middleware: it also sees responses raised past the middlewares
        # (404, 405). It is sent after aiohttp chose the Connection header, so set it too:
        # force_close() alone closes the connection without telling the client.
        if self._draining:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"

    async def recommend(self, request: web.Request) -> web.Response:
        tenant = self._admit(request, RECOMMEND).tenant
        self._funnel.refuse_if_denied(tenant.name)  # before the body is parsed
        body = parse_recommend(await request.read(), self._params())
        result = await self._funnel.recommend(
            tenant.name,
            body.user_id,
            body.num_items,
            request_id=client_request_id(request.headers.get(REQUEST_ID_KEY, "")),
        )
        payload = render(result, body.debug)
        if body.debug and (ids := tracing.current_ids()):
            payload["trace_id"] = ids[0]
        return web.json_response(payload)

    async def events(self, request: web.Request) -> web.Response:
        self._admit(request, EVENTS)
        now_ms = int(self._clock() * 1000)
        events = client_events(parse_events(await request.read(), self._params(now_ms)), now_ms)
        try:
            await self._funnel.append_events(events)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("events could not be stored; retry later") from exc
        return web.json_response({"accepted": len(events)}, status=202)

    async def upsert_items(self, request: web.Request) -> web.Response:
        """``PUT /v1/items``: a batch of catalog items (``gateway.catalog``) → 202."""
        tenant = self._admit(request, CATALOG).tenant
        items = parse_items(await request.read(), self._params())
        try:
            accepted = await self._catalog.upsert(tenant.name, items)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("items could not be stored; retry later") from exc
        return web.json_response({"accepted": accepted}, status=202)

    async def delete_item(self, request: web.Request) -> web.Response:
        """``DELETE /v1/items/{id}``: withdraw one item → 202."""
        self._admit(request, CATALOG)
        try:
            accepted = await self._catalog.delete([request.match_info["id"]])
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable("the delete could not be stored; retry later") from exc
        return web.json_response({"accepted": accepted}, status=202)

    async def report(self, request: web.Request) -> web.Response:
        """The calling tenant's report of one of its experiments (``gateway.reports``)."""
        tenant = self._admit(request, ADMIN).tenant  # also the tenant_var: the call's metadata
        body = await self._reports.report(tenant.name, request.match_info["key"])
        return web.json_response(body)

    async def erase_user(self, request: web.Request) -> web.Response:
        """``DELETE /v1/users/{user_id}``: erase one user of the calling tenant
        (``gateway.erasure``) → 200 with the counts, or 202 while it is still running."""
        caller = self._admit(request, ADMIN)  # the tenant travels in the call's metadata
        erased = await self._erasure.erase(request.match_info["user_id"], caller.key.key_id)
        body = {"tenant": caller.tenant.name, **erased.to_dict()}
        return web.json_response(body, status=200 if erased.status == "erased" else 202)

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while every dependency is SERVING and the API is not draining, else 503."""
        statuses = await self._downstreams.health()
        healthy = not self._draining and all(s == "SERVING" for s in statuses.values())
        return web.json_response(
            {
                "status": "SERVING" if healthy else "NOT_SERVING",
                "draining": self._draining,
                "dependencies": statuses,
            },
            status=200 if healthy else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return metrics_response(request.headers.get("Accept", ""))

    def _params(self, now_ms: int | None = None, item_width: int | None = None) -> dict[str, int]:
        """The run-time bounds of request bodies as of ``now_ms`` (default: the clock's now;
        ``gateway.schema.request_params``)."""
        now_ms = int(self._clock() * 1000) if now_ms is None else now_ms
        return request_params(self._max_items, now_ms, item_width)

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document (``gateway.openapi``) with the bounds the server applies now,
        the item feature width too when every tenant has the same. The widths are cached
        (``gateway.catalog``); asking for them waits :data:`WIDTH_WAIT_S` at most, then the
        document goes without (it is the gateway's liveness probe, docs/kubernetes.md)."""
        try:
            width = await asyncio.wait_for(
                self._catalog.common_width(list(self._tenants.tenants)), WIDTH_WAIT_S
            )
        except TimeoutError:
            width = None
        document = openapi_document(self._params(item_width=width), self._reports.keys())
        return web.json_response(document, dumps=lambda d: json.dumps(d, indent=2))
