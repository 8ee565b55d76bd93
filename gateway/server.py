"""Composition root of the gateway: gRPC API, HTTP API and the funnel they share."""

from __future__ import annotations

from dataclasses import dataclass

from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from core.experiments.book import load_experiments
from gateway.admission import AdmissionControl
from gateway.assignments import AssignmentCache
from gateway.catalog import CatalogWriter
from gateway.clients import Downstreams
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
from mesh.tenants import load_tenants


@dataclass(kw_only=True)
class GatewayService(Service):
    """The gateway's :class:`~mesh.service.Service` and its HTTP API listener."""

    http: HttpListener


async def build_service(
    settings: GatewaySettings,
    downstreams: Downstreams | None = None,
    assignments: AssignmentCache | None = None,
) -> GatewayService:
    """The gateway: gRPC on ``settings.port``, HTTP on ``settings.http_port``.

    ``downstreams`` defaults to channels to the addresses in ``settings``; the monolith
    baseline (``loadtest.monolith``) passes in-process ones. ``assignments`` defaults to a
    cache of experiment assignments sized by ``settings``; tests pass one on their own clock.

    Starting the service starts the HTTP listener too; its ``port`` is set then. When the
    server drains, the HTTP API answers with ``Connection: close`` and ``/healthz`` 503
    until the listener stops; requests in flight then get ``drain_grace_s`` to finish.

    Raises:
        ConfigError: the tenant or experiment file is missing or invalid.
    """
    tenants = load_tenants(settings.tenants)
    book = load_experiments(settings.experiments)
    downstreams = downstreams if downstreams is not None else Downstreams.open(settings)
    outbox = Outbox(settings.outbox)
    fallback = PopularFallback(downstreams.retrieval, list(tenants.tenants))
    if assignments is None:
        assignments = AssignmentCache(
            settings.experiment_cache_entries, settings.experiment_cache_ttl_s
        )
    quota = QuotaLeases(
        downstreams.quota,
        lease_max=settings.quota_lease_max,
        lease_ttl_s=settings.quota_lease_ttl_s,
        cap_s=settings.quota_budget_s,
    )
    admission = AdmissionControl(settings.admission())
    funnel = Funnel(settings, downstreams, book, outbox, fallback, assignments, quota, admission)
    relay = OutboxRelay(outbox, funnel.deliver)
    reports = ExperimentReports(downstreams.experiment, book, settings.report_timeout_s)
    catalog = CatalogWriter(downstreams.feature, funnel.append_events)
    api = HttpApi(funnel, tenants, downstreams, reports, catalog)
    http = HttpListener(
        api.app(settings.max_body_bytes),
        settings.host,
        settings.http_port,
        shutdown_timeout_s=settings.drain_grace_s,
        name="api",
    )
    return GatewayService(
        registrations=[
            Registration.of(
                GatewayServicer(funnel, tenants, catalog, settings.deadline_s),
                gateway_pb2,
                gateway_pb2_grpc,
                "GatewayService",
            )
        ],
        startups=[
            admission.start,
            downstreams.connect,
            fallback.start,
            relay.start,
            funnel.impressions.start,
            http.start,
        ],
        drains=[api.drain],
        cleanups=[
            http.stop,
            funnel.impressions.stop,
            relay.stop,
            fallback.stop,
            downstreams.close,
            admission.stop,
        ],
        http=http,
    )
