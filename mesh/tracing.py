"""Spans of the mesh: one tracer, the ``recmesh.*`` attributes, and the helpers every hop uses.

Processes get a tracer provider from :mod:`mesh.telemetry`; without one (tracing off, or
tests that set none) every helper here goes through the OpenTelemetry API's no-op tracer,
so the code paths are the same and cost a few microseconds.

Span layout (see ``docs/observability.md``):

* one SERVER span per incoming call (:func:`server_span`, from ``mesh.server``) and per
  HTTP request (:func:`http_server_span`, from ``gateway.http``), continuing the W3C trace
  context found in the gRPC metadata or HTTP headers;
* one CLIENT span per outgoing attempt (:func:`client_span`, from ``mesh.client``), whose
  context is injected into the call's metadata (``traceparent``, ``tracestate``);
* ``stage.<name>`` INTERNAL spans for funnel and service stages (:func:`stage_span`, and
  :func:`record_stage` for stages timed after the fact by ``mesh.stages.StageClock``);
* CLIENT spans for Redis round trips (:func:`redis_span`).

Attributes the mesh adds are flat names under ``recmesh.``: ``stage_span("prerank",
candidates_in=500)`` sets ``recmesh.stage="prerank"`` and ``recmesh.candidates_in=500``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

tracer = trace.get_tracer("recmesh")
"""The mesh's tracer; delegates to whatever provider :mod:`mesh.telemetry` installed."""

ROOT = otel_context.Context()
"""An empty context: a span started with ``context=ROOT`` begins a new trace."""

NO_SPAN: Span = trace.INVALID_SPAN
"""A span that records nothing (for code paths that are not traced)."""

PREFIX = "recmesh."

# Attribute names used outside this module (tests, dashboards, the collector's policies).
TENANT = "recmesh.tenant"
REQUEST_ID = "recmesh.request_id"
STAGE = "recmesh.stage"
DEGRADED = "recmesh.degraded"
DEGRADED_REASON = "recmesh.degraded_reason"
DEGRADED_STAGES = "recmesh.degraded_stages"
BREAKER_STATE = "recmesh.breaker_state"
FAULT_FLAG = "recmesh.fault_flag"
FAULT_INJECTED = "recmesh.fault_injected"

# gRPC status codes that make a SERVER span an error (semantic conventions for gRPC);
# on CLIENT spans every code but OK is an error.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def recmesh_attributes(**attrs: AttributeValue | None) -> dict[str, AttributeValue]:
    """``{"recmesh.<key>": value}`` for every value that is not None."""
    return {PREFIX + key: value for key, value in attrs.items() if value is not None}


def annotate(span: Span | None = None, **attrs: AttributeValue | None) -> None:
    """Set ``recmesh.<key>`` attributes on ``span`` (default: the current span)."""
    target = span if span is not None else trace.get_current_span()
    if target.is_recording():
        target.set_attributes(recmesh_attributes(**attrs))


def mark_degraded(reason: str, span: Span | None = None) -> None:
    """Name ``span`` (default: the current one) degraded, with why.

    Degraded is not an error (the request was answered); the collector's tail sampling
    keeps every trace with ``recmesh.degraded = true``.
    """
    annotate(span, degraded=True, degraded_reason=reason)


def record_error(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` and mark the span an error (for exceptions that were handled)."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _split_method(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _rpc_attributes(method: str) -> dict[str, AttributeValue]:
    service, name = _split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def extract(carrier: Mapping[str, Any]) -> otel_context.Context:
    """The trace context (W3C ``traceparent``/``tracestate``, baggage) carried in ``carrier``."""
    return propagate.extract(carrier)


def inject(carrier: MutableMapping[str, str], span: Span | None = None) -> None:
    """Write the context of ``span`` (default: the current one) into ``carrier``."""
    ctx = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(carrier, context=ctx)


@contextmanager
def server_span(
    method: str, metadata: Mapping[str, Any], **attrs: AttributeValue | None
) -> Iterator[Span]:
    """The current SERVER span of an incoming gRPC call, child of the caller's context.

    The caller sets the status with :func:`end_rpc`; exceptions are not recorded here.
    """
    attributes = _rpc_attributes(method)
    attributes.update(recmesh_attributes(**attrs))
    with tracer.start_as_current_span(
        method.lstrip("/"),
        context=extract(metadata),
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


@contextmanager
def http_server_span(
    method: str, route: str, headers: Mapping[str, str], path: str
) -> Iterator[Span]:
    """The current SERVER span of an HTTP request, child of a ``traceparent`` header if sent.

    Set the response status with :func:`end_http`. An exception leaving the block is
    recorded and marks the span an error.
    """
    with tracer.start_as_current_span(
        f"{method} {route}",
        context=extract(headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route, "url.path": path},
    ) as span:
        yield span


def end_http(span: Span, status: int) -> None:
    """Record the response status; 5xx marks the span an error (4xx is the client's)."""
    if not span.is_recording():
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def client_span(method: str, target: str) -> Span:
    """A started (not current) CLIENT span for one attempt of ``method`` to ``target``.

    End it with :func:`end_rpc` and ``span.end()``; inject its context with :func:`inject`.
    """
    attributes = _rpc_attributes(method)
    host, _, port = target.rpartition(":")
    if host and port.isdigit():
        attributes["server.address"] = host
        attributes["server.port"] = int(port)
    return tracer.start_span(
        method.lstrip("/"),
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def end_rpc(span: Span, code: grpc.StatusCode, *, server: bool, details: str = "") -> None:
    """Record the call's status code on ``span`` and mark it an error where it is one."""
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK and (not server or code in _SERVER_ERRORS):
        description = f"{code.name}: {details}" if details else code.name
        span.set_status(Status(StatusCode.ERROR, description))


@contextmanager
def stage_span(stage: str, **attrs: AttributeValue | None) -> Iterator[Span]:
    """A current ``stage.<stage>`` span with ``recmesh.stage`` and ``recmesh.<key>`` attributes.

    An exception leaving the block is recorded and marks the span an error.
    """
    with tracer.start_as_current_span(
        f"stage.{stage}", attributes=recmesh_attributes(stage=stage, **attrs)
    ) as span:
        yield span


def record_stage(stage: str, start_ns: int, end_ns: int, **attrs: AttributeValue | None) -> None:
    """A ``stage.<stage>`` span that ran from ``start_ns`` to ``end_ns`` (``time.time_ns``).

    For stages timed after they ran (laps of a clock): the span is a child of the current
    span, and calls made during the stage are its siblings rather than its children.
    """
    span = tracer.start_span(
        f"stage.{stage}",
        start_time=start_ns,
        attributes=recmesh_attributes(stage=stage, **attrs),
    )
    if attrs.get("degraded_reason"):
        span.set_attribute(DEGRADED, True)
    span.end(end_time=end_ns)


@contextmanager
def redis_span(
    operation: str, client: Any = None, **attrs: AttributeValue | None
) -> Iterator[Span]:
    """A current CLIENT span for one Redis round trip (one command or one pipeline).

    Args:
        operation: the command(s), e.g. ``"MGET"`` or ``"GET+LRANGE+HGET"`` for a pipeline.
        client: the ``redis.asyncio.Redis`` client, for the server address.
        attrs: ``recmesh.<key>`` attributes (e.g. ``keys=200``).
    """
    attributes: dict[str, AttributeValue] = {
        "db.system.name": "redis",
        "db.operation.name": operation,
    }
    if "+" in operation:
        attributes["db.operation.batch.size"] = operation.count("+") + 1
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict) and "host" in kwargs:
        attributes["server.address"] = str(kwargs["host"])
        attributes["server.port"] = int(kwargs.get("port", 6379))
        attributes["db.namespace"] = str(kwargs.get("db", 0))
    attributes.update(recmesh_attributes(**attrs))
    with tracer.start_as_current_span(
        f"redis {operation}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield span


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in hex of the current span, or None outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def exemplar(span: Span | None = None) -> dict[str, str] | None:
    """A Prometheus exemplar naming the trace of ``span`` (default: current) when it is
    sampled, so a latency bucket links to a trace that fell in it."""
    target = span if span is not None else trace.get_current_span()
    ctx = target.get_span_context()
    if not ctx.trace_flags.sampled:
        return None
    return {"trace_id": trace.format_trace_id(ctx.trace_id)}


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span ("" outside a trace)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def link_to(traceparent: str) -> Link | None:
    """A span link to the span a ``traceparent`` names (None when it names none)."""
    if not traceparent:
        return None
    ctx = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
    return Link(ctx) if ctx.is_valid else None
