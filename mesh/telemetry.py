"""Telemetry of a process: OpenTelemetry tracing from the ``OTEL_*`` variables, and ``/metrics``.

Tracing (:func:`setup_tracing`) honours the standard variables:

* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): where spans
  go, over OTLP/gRPC through a batch processor (``OTEL_BSP_*`` tune it). **Unset means
  tracing is off**: no provider is installed, no exporter exists, nothing is attempted.
  ``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` turn it off too.
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the head sampler. The default is
  ``parentbased_traceidratio`` with ratio 0.1: one trace in ten goes to the collector (whose
  tail sampling keeps the errors, degraded and slow ones among them and a share of the
  rest). Recording and exporting every trace cost a quarter of a request's CPU at 1M items
  (``docs/observability.md``); a caller that needs a given request traced sends a sampled
  ``traceparent``, which every process follows.
* ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``: the resource; they override the
  defaults (``service.name`` = the process's service name, ``service.namespace=recmesh``).
* The exporter reads its own ``OTEL_EXPORTER_OTLP_*`` settings (headers, timeout,
  compression, insecure).

Metrics: Prometheus pull. Every service serves ``GET /metrics`` on its own HTTP port
(:func:`mesh.http.metrics_listener`, the ``metrics_port`` setting,
``RECMESH_<SERVICE>_METRICS_PORT``, defaults in :data:`mesh.ports.DEFAULT_METRICS_PORTS`);
the gateway serves it on its HTTP API port.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from mesh.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_RATIO = 0.1

_TRUE = {"1", "true", "yes", "on"}


def tracing_endpoint(environ: Mapping[str, str]) -> str:
    """The OTLP endpoint spans go to, or "" when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return ""
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return ""
    return (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def _ratio(environ: Mapping[str, str]) -> float:
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if not raw:
        return DEFAULT_RATIO
    try:
        ratio = float(raw)
    except ValueError as exc:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a number") from exc
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} must be in [0, 1]")
    return ratio


def sampler_from_env(environ: Mapping[str, str]) -> Sampler:
    """The head sampler named by ``OTEL_TRACES_SAMPLER`` (default parent-based ratio 0.1).

    Raises:
        ConfigError: an unknown sampler name or a ratio outside [0, 1].
    """
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if name == "always_on":
        return ALWAYS_ON
    if name == "always_off":
        return ALWAYS_OFF
    if name == "traceidratio":
        return TraceIdRatioBased(_ratio(environ))
    if name == "parentbased_always_on":
        return ParentBased(ALWAYS_ON)
    if name == "parentbased_always_off":
        return ParentBased(ALWAYS_OFF)
    if name == "parentbased_traceidratio":
        return ParentBased(TraceIdRatioBased(_ratio(environ)))
    raise ConfigError(
        f"OTEL_TRACES_SAMPLER={name!r} is not supported; use always_on, always_off, "
        "traceidratio or their parentbased_ forms"
    )


def resource_for(service_name: str) -> Resource:
    """The resource of this process: defaults, overridden by the ``OTEL_*`` variables."""
    defaults = {
        "service.name": service_name,
        "service.namespace": "recmesh",
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
    }
    return Resource.create(defaults).merge(OTELResourceDetector().detect())


@dataclass
class Telemetry:
    """What :func:`setup_tracing` installed; ``provider`` is None when tracing is off."""

    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Export what is buffered (at most ``timeout_s``), then stop the exporter."""
        if self.provider is None:
            return
        self.provider.force_flush(int(timeout_s * 1000))
        self.provider.shutdown()


def setup_tracing(
    service_name: str,
    environ: Mapping[str, str] | None = None,
    processor: SpanProcessor | None = None,
) -> Telemetry:
    """Install the process's tracer provider, or nothing when tracing is off.

    Args:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` says otherwise.
        environ: the variables to read (default ``os.environ``).
        processor: replaces the OTLP batch processor (tests).

    Raises:
        ConfigError: a sampler variable is invalid.
    """
    source = os.environ if environ is None else environ
    endpoint = tracing_endpoint(source)
    if not endpoint and processor is None:
        log.info("tracing off (OTEL_EXPORTER_OTLP_ENDPOINT is not set)")
        return Telemetry()
    provider = TracerProvider(sampler=sampler_from_env(source), resource=resource_for(service_name))
    if processor is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter: SpanExporter = OTLPSpanExporter()
        processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    log.info(
        "tracing on",
        extra={"fields": {"endpoint": endpoint, "sampler": provider.sampler.get_description()}},
    )
    return Telemetry(provider)


def metrics_response(accept: str) -> web.Response:
    """The default registry in the format ``accept`` asks for (OpenMetrics carries exemplars)."""
    encoder, content_type = choose_encoder(accept)
    return web.Response(body=encoder(REGISTRY), headers={"Content-Type": content_type})
