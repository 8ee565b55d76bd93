"""Composition root of the gateway: gRPC API, HTTP API and the funnel they share."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.clients import Downstreams
from gateway.fallback import PopularFallback
from gateway.funnel import Funnel
from gateway.grpc_api import GatewayServicer
from gateway.http import HttpApi
from gateway.outbox import Outbox, OutboxRelay
from gateway.settings import GatewaySettings
from mesh.server import MeshServer, Registration
from mesh.tenants import load_tenants
from services.experiment.assignment import load_experiments


@dataclass
class HttpListener:
    """The aiohttp listener; ``port`` is the bound port once started."""

    app: web.Application
    host: str
    port: int
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_port=False)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def build_gateway(settings: GatewaySettings) -> tuple[MeshServer, HttpListener]:
    """The gateway: gRPC on ``settings.port``, HTTP on ``settings.http_port``.

    Starting the server starts the HTTP listener too; its ``port`` is set then.

    Raises:
        ConfigError: the tenant or experiment file is missing or invalid.
    """
    tenants = load_tenants(settings.tenants)
    book = load_experiments(settings.experiments)
    downstreams = Downstreams.open(settings)
    outbox = Outbox(settings.outbox)
    fallback = PopularFallback(downstreams.retrieval, list(tenants.tenants))
    funnel = Funnel(settings, downstreams, book, outbox, fallback)
    relay = OutboxRelay(outbox, funnel.deliver)
    http = HttpListener(
        HttpApi(funnel, tenants, downstreams).app(settings.max_body_bytes),
        settings.host,
        settings.http_port,
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
        startups=[downstreams.connect, fallback.start, relay.start, http.start],
        cleanups=[http.stop, funnel.drain, relay.stop, fallback.stop, downstreams.close],
    )
    return server, http


async def build_server(settings: GatewaySettings) -> MeshServer:
    """:func:`build_gateway` for the process runner, which needs only the server."""
    server, _ = await build_gateway(settings)
    return server
