"""The server factory every service uses.

``MeshServer`` wires a ``grpc.aio`` server with the common interceptor (context from
metadata, per-call budget, domain errors mapped to status codes, access logs), component
health on ``grpc.health.v1``, reflection, and graceful drain: on SIGTERM health turns
NOT_SERVING and the drain hooks run (e.g. the gateway's HTTP API starts closing
keep-alive connections), callers get ``drain_delay_s`` to notice, in-flight calls get
``drain_grace_s`` to finish, then the server stops and its clean-ups run.
With TLS on (:mod:`mesh.tls`) the port requires a client certificate the mesh's CA signed,
and the interceptor holds every call to :mod:`mesh.identity`'s rule on who may act for a
tenant; ``health_port`` adds a plaintext port that serves only ``grpc.health.v1``.
Tests call ``await server.start()`` on port 0 and read the bound port from it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_reflection.v1alpha import reflection

from mesh.faults import FaultInjector
from mesh.handling import CallFailed, MethodHandling
from mesh.health import HealthMonitor
from mesh.pipe import SERVICE_NAME as PIPE_SERVICE
from mesh.pipe import PipeServicer
from mesh.service import Service
from mesh.settings import ServerSettings
from mesh.tls import Transport, peer_identity

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], failed: CallFailed) -> None:
    if failed.trailing:
        context.set_trailing_metadata(failed.trailing)
    await context.abort(failed.code, failed.details)


class _MeshInterceptor(grpc.aio.ServerInterceptor):
    """Runs every unary call through its method's :class:`MethodHandling` (the span
    continues the caller's trace from the call metadata); a :class:`CallFailed` aborts the
    call with its status and trailing metadata."""

    def __init__(
        self, settings: ServerSettings, faults: FaultInjector, *, secure: bool = False
    ) -> None:
        self._settings = settings
        self._faults = faults
        self._secure = secure

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith("/grpc."):
            return handler
        inner = cast(Callable[[Any, Any], Awaitable[Any]], handler.unary_unary)
        handling = MethodHandling(
            method,
            self._settings,
            self._faults,
            secure=self._secure,
            deserialize=handler.request_deserializer,
        )

        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            try:
                return await handling.run(
                    metadata,
                    handling.budget_s(context.time_remaining()),
                    lambda: peer_identity(context),
                    raw,
                    lambda request: inner(request, context),
                )
            except CallFailed as failed:
                await _abort(context, failed)
            return None  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )


class MeshServer:
    """A gRPC service process: a built :class:`~mesh.service.Service` served with health,
    reflection, fault flags and drain.

    Args:
        settings: listening address, limits and drain timings.
        service: the servicers to mount and the lifecycle: checks (SERVING only while all
            pass), start-ups (after the gRPC port serves), drain hooks (as soon as the drain
            begins, before ``drain_delay_s``), clean-ups (after the server stopped).
        transport: how the port is served; default :meth:`mesh.tls.Transport.of` the
            settings (mTLS as ``service_name`` unless ``settings.tls`` is off).
    """

    def __init__(
        self, settings: ServerSettings, service: Service, transport: Transport | None = None
    ) -> None:
        self.settings = settings
        self.service = service
        self.transport = Transport.of(settings) if transport is None else transport
        self.port = 0
        self.health_port = 0
        self.health = HealthMonitor(
            service.checks,
            [r.full_name for r in service.registrations],
            self.settings.health_interval_s,
        )
        faults_file = Path(self.settings.faults_file) if self.settings.faults_file else None
        self.faults = FaultInjector(self.settings.service_name, faults_file)
        self._faults_task: asyncio.Task[None] | None = None
        self._server = grpc.aio.server(
            interceptors=[
                _MeshInterceptor(self.settings, self.faults, secure=self.transport.secure)
            ],
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", self.settings.max_receive_bytes),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
                *service.server_options,
            ],
        )
        self._health_server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self.pipe = (
            PipeServicer(
                service.registrations,
                self.settings,
                self.faults,
                secure=self.transport.secure,
                max_in_flight=self.settings.max_concurrent_rpcs,
            )
            if service.pipe
            else None
        )
        """Serves the registrations' unary methods through pipes (:mod:`mesh.pipe`)."""

    async def start(self) -> int:
        """Bind, start serving and return the bound port (useful with port 0)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        for registration in self.service.registrations:
            registration.add(registration.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._server)
        names = [r.full_name for r in self.service.registrations]
        if self.pipe is not None:
            self._server.add_generic_rpc_handlers((self.pipe.handler(),))
            names.append(PIPE_SERVICE)
        names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self._server)
        self.port = self.transport.add_port(
            self._server, f"{self.settings.host}:{self.settings.port}"
        )
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.settings.host}:{self.settings.port}")
        if self.settings.health_port >= 0:
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self._health_server)
            address = f"{self.settings.host}:{self.settings.health_port}"
            self.health_port = self._health_server.add_insecure_port(address)
            if self.health_port == 0:
                raise RuntimeError(f"could not bind the health port {address}")
        await self.health.starting()
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        self._faults_task = asyncio.create_task(self.faults.watch())
        for startup in self.service.startups:
            await startup()
        await self.health.start()
        log.info(
            "serving",
            extra={
                "fields": {
                    "port": self.port,
                    "services": names[:-1],
                    "tls": self.transport.secure,
                }
            },
        )
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, run the drain hooks, wait ``drain_delay_s``, let calls
        finish, stop, clean up.

        With ``grace_s`` (tests) there is no delay and calls get ``grace_s`` to finish.
        """
        if self._stopped.is_set():
            return
        await self.health.drain()
        if self.pipe is not None:
            self.pipe.drain()
        for drain in self.service.drains:
            await drain()
        await asyncio.sleep(self.settings.drain_delay_s if grace_s is None else 0)
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._faults_task is not None:
            self._faults_task.cancel()
        for cleanup in self.service.cleanups:
            await cleanup()
        self._stopped.set()
        log.info("stopped")

    async def serve_until_signalled(self) -> None:
        """Start, then run until SIGTERM or SIGINT, then drain and stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("draining")
        await self.stop()
