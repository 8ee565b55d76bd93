"""Composition root of the gateway: gRPC API, HTTP API and the funnel they share."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from core.experiments.book import load_experiments
from gateway.assignments import AssignmentCache
from gateway.clients import Downstreams
from gateway.fallback import PopularFallback
from gateway.funnel import Funnel
from gateway.grpc_api import GatewayServicer
from gateway.http import HttpApi
from gateway.outbox import Outbox, OutboxRelay
from gateway.quota import QuotaLeases
from gateway.settings import GatewaySettings
from mesh.server import MeshServer, Registration
from mesh.tenants import load_tenants


@dataclass
class HttpListener:
    """The aiohttp listener; ``port`` is the bound port once started.

    ``shutdown_timeout_s`` is how long requests in flight when it stops get to finish.
    """

    app: web.Application
    host: str
    port: int
    shutdown_timeout_s: float
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; set ``port`` to the bound port (useful with port 0)."""
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_timeout_s,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_port=False)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening, close idle connections, give requests in flight up to
        ``shutdown_timeout_s`` to finish (their connections close after the response),
        then cancel what is left."""
        if self.runner is not None:
            await self.runner.cleanup()


async def build_gateway(
    settings: GatewaySettings,
    downstreams: Downstreams | None = None,
    assignments: AssignmentCache | None = None,
) -> tuple[MeshServer, HttpListener]:
    """The gateway: gRPC on ``settings.port``, HTTP on ``settings.http_port``.

    ``downstreams`` defaults to channels to the addresses in ``settings``; the monolith
    baseline (``loadtest.monolith``) passes in-process ones. ``assignments`` defaults to a
    cache of experiment assignments sized by ``settings``; tests pass one on their own clock.

    Starting the server starts the HTTP listener too; its ``port`` is set then. When the
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
    funnel = Funnel(settings, downstreams, book, outbox, fallback, assignments, quota)
    relay = OutboxRelay(outbox, funnel.deliver)
    api = HttpApi(funnel, tenants, downstreams)
    http = HttpListener(
        api.app(settings.max_body_bytes), settings.host, settings.http_port, settings.drain_grace_s
    )
    server = MeshServer(
        settings,
        [
            Registration.of(
                GatewayServicer(funnel, tenants, settings.deadline_s),
                gateway_pb2,
                gateway_pb2_grpc,
                "GatewayService",
            )
        ],
        startups=[
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
        ],
    )
    return server, http


async def build_server(settings: GatewaySettings) -> MeshServer:
    """:func:`build_gateway` for the process runner, which needs only the server."""
    server, _ = await build_gateway(settings)
    return server
