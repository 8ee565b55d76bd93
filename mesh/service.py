"""What a service's builder returns: its servicers and its lifecycle.

Every service (and the gateway) has one composition root, ``build_service(settings, ...)
-> Service``. Every way of running it uses that one builder: the process entry point
(:func:`mesh.runner.run_service` wraps it in a :class:`~mesh.server.MeshServer`), the
in-process tests (the same, on port 0) and the in-process monolith baseline
(``loadtest.monolith``), which calls the servicers through local stubs and runs every
service's lifecycle inside the gateway's (:meth:`Service.embed`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc

from mesh.health import HealthCheck

Hook = Callable[[], Awaitable[None]]
"""A step a server awaits at start-up, when its drain begins, or at clean-up."""


@dataclass(frozen=True)
class Registration:
    """One servicer to mount: ``add(servicer, server)`` is the generated ``add_*_to_server``."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str

    @classmethod
    def of(cls, servicer: Any, pb2: ModuleType, pb2_grpc: ModuleType, service: str) -> Registration:
        """The registration of ``service`` (e.g. "FeatureService") from its generated modules."""
        return cls(
            getattr(pb2_grpc, f"add_{service}Servicer_to_server"),
            servicer,
            pb2.DESCRIPTOR.services_by_name[service].full_name,
        )


@dataclass
class Service:
    """A built service: what it serves and the steps of its life.

    Args:
        registrations: the servicers to mount.
        checks: component health checks; SERVING only while all pass.
        startups: awaited in order after the gRPC port is serving (connect downstreams,
            prepare Redis scripts, start background tasks, an HTTP listener...).
        drains: awaited in order as soon as the drain begins, once health is NOT_SERVING
            and while every port still serves (e.g. tell HTTP clients to stop reusing
            connections).
        cleanups: awaited in order after the server stopped (close clients, flush...).
        server_options: gRPC server options added to the mesh's own (e.g. the gateway's
            limits on a client's metadata and connections).
        pipe: serve the registrations' unary methods through pipes too
            (:mod:`mesh.pipe`); off for a public API whose callers are not mesh services.
    """

    registrations: Sequence[Registration]
    checks: list[HealthCheck] = field(default_factory=list)
    startups: list[Hook] = field(default_factory=list)
    drains: list[Hook] = field(default_factory=list)
    cleanups: list[Hook] = field(default_factory=list)
    server_options: list[tuple[str, Any]] = field(default_factory=list)
    pipe: bool = True

    def servicer(self, service: str) -> Any:
        """The servicer registered for ``service``, by short or full name ("RankingService").

        Raises:
            KeyError: no such service is registered.
        """
        for registration in self.registrations:
            if service in (registration.full_name, registration.full_name.rsplit(".", 1)[-1]):
                return registration.servicer
        raise KeyError(f"no servicer registered for {service!r}")

    def embed(self, *inner: Service) -> None:
        """Run ``inner`` services' lifecycles inside this one, in one process.

        Their start-ups run before this service's own (so what it calls is ready), their
        clean-ups after its own (in reverse order), their checks count towards its health.
        Their servicers are not mounted: the caller reaches them through local stubs.
        """
        self.startups[0:0] = [hook for service in inner for hook in service.startups]
        self.drains += [hook for service in inner for hook in service.drains]
        self.cleanups += [hook for service in reversed(inner) for hook in service.cleanups]
        self.checks += [check for service in inner for check in service.checks]
