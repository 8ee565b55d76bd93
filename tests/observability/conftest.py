"""A tracer provider for in-process tests, with a processor that keeps finished spans.

The OpenTelemetry API allows one global provider per process, so it is installed once for
the session. Spans are sampled (recorded) only while a test captures: outside, the sampler
drops them, so later tests of the session (some time their work in milliseconds) pay about
what they pay with no provider.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from mesh.telemetry import resource_for


class SpanCapture(SpanProcessor):
    """Keeps the spans that end while :meth:`capturing` is active."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self.spans: list[ReadableSpan] = []

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            if self._active:
                self.spans.append(span)

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        with self._lock:
            self.spans, self._active = [], True

    def stop(self) -> list[ReadableSpan]:
        with self._lock:
            self._active = False
            return list(self.spans)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _WhileCapturing(Sampler):
    """Records every span while the capture is active, none otherwise."""

    def __init__(self, capture: SpanCapture) -> None:
        self._capture = capture

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        decision = Decision.RECORD_AND_SAMPLE if self._capture.active else Decision.DROP
        return SamplingResult(decision)

    def get_description(self) -> str:
        return "WhileCapturing"


_CAPTURE = SpanCapture()


@pytest.fixture(scope="session")
def span_capture() -> SpanCapture:
    """The session's capture, installed on the global tracer provider on first use."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(
            sampler=_WhileCapturing(_CAPTURE), resource=resource_for("inprocess")
        )
        trace.set_tracer_provider(provider)
    provider.add_span_processor(_CAPTURE)
    return _CAPTURE


@pytest.fixture
def spans(span_capture: SpanCapture) -> Iterator[SpanCapture]:
    """Capture the spans that end during the test."""
    span_capture.start()
    yield span_capture
    span_capture.stop()
