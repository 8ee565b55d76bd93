"""Composition root of the gateway: gRPC API, HTTP API and the funnel they share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from core.experiments.book import load_experiments
from gateway.admission import AdmissionControl
from gateway.assignments import AssignmentCache
from gateway.catalog import CatalogWriter
from gateway.clients import Downstreams
from gateway.erasure import UserErasure
from gateway.fallback import PopularFallback
from gateway.funnel import Funnel
from gateway.grpc_api import GatewayServicer
from gateway.http import HttpApi
from gateway.outbox import Outbox, OutboxRelay
from gateway.quota import QuotaLeases
from gateway.reports import ExperimentReports
from gateway.settings import GatewaySettings
from mesh.http import HttpListener
from mesh.service import Registration, Service
from mesh.tenants import LiveRegistry


@dataclass(kw_only=True)
class GatewayService(Service):
    """The gateway's :class:`~mesh.service.Service` and its HTTP API listener."""

    http: HttpListener


async def build_service(
    settings: GatewaySettings,
    downstreams: Downstreams | None = None,
    assignments: AssignmentCache | None = None,
    clock: Callable[[], float] = time.time,
) -> GatewayService:
    """The gateway: gRPC on ``settings.port``, HTTP on ``settings.http_port``.

    ``downstreams`` defaults to channels to the addresses in ``settings``; the monolith
    baseline (``loadtest.monolith``) passes in-process ones. ``assignments`` defaults to a
    cache of experiment assignments sized by ``settings``; tests pass one on their own clock.
    ``clock`` (wall seconds) is the now the HTTP API checks event times against and states
    in its OpenAPI document (the fuzz test fixes it).

    Starting the service starts the HTTP listener too; its ``port`` is set then. When the
    server drains, the HTTP API answers with ``Connection: close`` and ``/healthz`` 503
    until the listener stops; requests in flight then get ``drain_grace_s`` to finish.

    The tenant file is watched (``mesh.tenants.LiveRegistry``): keys added, revoked or
    expired and scopes changed there apply to the next request, without a restart.

    Raises:
        ConfigError: the tenant or experiment file is missing or invalid.
    """
    tenants = LiveRegistry(settings.tenants, settings.tenants_poll_s)
    book = load_experiments(settings.experiments)
    downstreams = downstreams if downstreams is not None else Downstreams.open(settings)
    outbox = Outbox(settings.outbox)
    fallback = PopularFallback(downstreams.retrieval, downstreams.feature, list(tenants.tenants))
    if assignments is None:
        assignments = AssignmentCache(
            settings.experiment_cache_entries, settings.experiment_cache_ttl_s
        )
    quota = QuotaLeases(
        downstreams.quota,
        lease_max=settings.quota_lease_max,
        lease_ttl_s=settings.quota_lease_ttl_s,
        refresh_ahead_s=settings.quota_lease_refresh_ahead_s,
        cap_s=settings.quota_budget_s,
    )
    admission = AdmissionControl(settings.admission())
    funnel = Funnel(settings, downstreams, book, outbox, fallback, assignments, quota, admission)
    relay = OutboxRelay(outbox, funnel.deliver)
    reports = ExperimentReports(downstreams.experiment, book, settings.report_timeout_s)
    catalog = CatalogWriter(downstreams.feature, funnel.append_events)
    erasure = UserErasure(downstreams.events, settings.erase_timeout_s)
    api = HttpApi(
        funnel,
        tenants,
        downstreams,
        reports,
        catalog,
        erasure,
        max_items=settings.max_items,
        clock=clock,
    )
    http = HttpListener(
        api.app(settings.max_body_bytes, body_timeout_s=settings.http_body_timeout_s),
        settings.host,
        settings.http_port,
        shutdown_timeout_s=settings.drain_grace_s,
        name="api",
        limits=settings.http_limits(),
    )
    return GatewayService(
        registrations=[
            Registration.of(
                GatewayServicer(funnel, tenants, catalog, erasure, settings.deadline_s),
                gateway_pb2,
                gateway_pb2_grpc,
                "GatewayService",
            )
        ],
        # The public API: its callers are applications with API keys, not mesh services.
        pipe=False,
        startups=[
            tenants.start,
            admission.start,
            downstreams.connect,
            fallback.start,
            relay.start,
            funnel.impressions.start,
            funnel.usage.start,
            http.start,
        ],
        drains=[api.drain],
        cleanups=[
            http.stop,
            funnel.usage.stop,
            funnel.impressions.stop,
            relay.stop,
            fallback.stop,
            downstreams.close,
            admission.stop,
            tenants.stop,
        ],
        server_options=settings.grpc_server_options(),
        http=http,
    )
