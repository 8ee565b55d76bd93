"""Tracing, metrics and log correlation of the mesh, in-process (one provider, every service)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from recmesh.events.v1 import events_pb2

from gateway.outbox import Outbox
from gateway.settings import GatewaySettings
from mesh import tracing
from mesh.errors import ConfigError
from mesh.http import metrics_listener
from mesh.logging import JsonFormatter
from mesh.settings import load
from mesh.telemetry import (
    resource_for,
    sampler_from_env,
    setup_tracing,
    tracing_endpoint,
)
from services.feature.settings import FeatureSettings
from services.quota.settings import QuotaSettings
from tests.inprocess import Mesh, inprocess_mesh, set_faults, write_tenants
from tests.observability.conftest import SpanCapture

DEMO = {"x-api-key": "demo-key"}


def test_tracing_is_off_without_an_endpoint() -> None:
    before = trace.get_tracer_provider()
    telemetry = setup_tracing("feature", environ={})
    assert not telemetry.enabled
    assert trace.get_tracer_provider() is before
    telemetry.shutdown()  # nothing to flush, no error


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "http://c:4317"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317"}, "http://t:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, ""),
    ],
)
def test_endpoint_from_the_standard_variables(environ: dict[str, str], endpoint: str) -> None:
    assert tracing_endpoint(environ) == endpoint


def test_sampler_defaults_to_parent_based_ratio() -> None:
    assert sampler_from_env({}).get_description() == (
        "ParentBased{root:TraceIdRatioBased{0.1},remoteParentSampled:AlwaysOnSampler,"
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
        "localParentNotSampled:AlwaysOffSampler}"
    )
    one_percent = sampler_from_env(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    )
    assert "TraceIdRatioBased{0.01}" in one_percent.get_description()
    assert sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"}).get_description() == (
        "AlwaysOffSampler"
    )


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
        {"OTEL_TRACES_SAMPLER_ARG": "2"},
        {"OTEL_TRACES_SAMPLER_ARG": "half"},
    ],
)
def test_bad_sampler_settings_fail_fast(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_SAMPLER"):
        sampler_from_env(environ)


def test_resource_defaults_and_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = resource_for("ranking").attributes
    assert attributes["service.name"] == "ranking"
    assert attributes["service.namespace"] == "recmesh"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ranking-canary")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=shop,region=eu")
    attributes = resource_for("ranking").attributes
    assert (attributes["service.name"], attributes["service.namespace"]) == (
        "ranking-canary",
        "shop",
    )
    assert attributes["region"] == "eu"


def test_metrics_port_per_service() -> None:
    assert load(FeatureSettings, {}).metrics_port == 9101
    assert load(GatewaySettings, {}).metrics_port < 0  # served on the HTTP API instead
    assert load(FeatureSettings, {"RECMESH_FEATURE_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(ConfigError, match="RECMESH_QUOTA_METRICS_PORT"):
        load(QuotaSettings, {"RECMESH_QUOTA_METRICS_PORT": "x"})
    with pytest.raises(ConfigError, match="RECMESH_QUOTA_METRICS_PORT"):
        load(QuotaSettings, {"RECMESH_QUOTA_METRICS_PORT": "70000"})
    with pytest.raises(ConfigError, match="RECMESH_FEATURE_PORT"):
        load(FeatureSettings, {"RECMESH_FEATURE_PORT": "-1"})


async def test_metrics_endpoint_serves_the_registry_with_exemplars() -> None:
    endpoint = metrics_listener("127.0.0.1", 0)
    await endpoint.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{endpoint.port}/metrics"
            async with session.get(url) as response:
                assert response.status == 200
                assert "recmesh_rpc_server_handling_seconds" in await response.text()
            openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with session.get(url, headers=openmetrics) as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    finally:
        await endpoint.stop()


def test_log_lines_carry_trace_and_span_ids(span_capture: SpanCapture) -> None:
    formatter = JsonFormatter("gateway")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    with tracing.tracer.start_as_current_span("work") as span:
        entry = json.loads(formatter.format(record))
    ctx = span.get_span_context()
    assert entry["trace_id"] == trace.format_trace_id(ctx.trace_id)
    assert entry["span_id"] == trace.format_span_id(ctx.span_id)


async def test_outbox_file_without_trace_column_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,"
        " event BLOB NOT NULL)"
    )
    db.execute("INSERT INTO outbox (tenant, event) VALUES ('demo', ?)", (b"",))
    db.commit()
    db.close()
    outbox = Outbox(path)
    await outbox.put("demo", [events_pb2.Event(event_id="e1")])
    assert [(t, e.event_id, tp) for _, t, e, tp in await outbox.take_traced(10)] == [
        ("demo", "", ""),
        ("demo", "e1", ""),
    ]
    outbox.close()


# ---- the mesh in-process ----


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str,
    artifacts_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    span_capture: SpanCapture,
) -> AsyncIterator[tuple[Mesh, Path]]:
    base = tmp_path_factory.mktemp("traced-inprocess")
    faults = base / "faults.json"
    async with inprocess_mesh(
        redis_url, artifacts_root, write_tenants(base / "tenants.json"), faults
    ) as running:
        yield running, faults


async def recommend(mesh: Mesh, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http_url + "/v1/recommend",
            json={"user_id": "u1", "num_items": 10, "debug": True},
            headers={**DEMO, **(headers or {})},
        ) as response,
    ):
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


def of_trace(spans: list[ReadableSpan], trace_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.context is not None and trace.format_trace_id(s.context.trace_id) == trace_id
    ]


def named(spans: list[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def parent_of(spans: list[ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    assert span.parent is not None
    return next(
        s for s in spans if s.context is not None and s.context.span_id == span.parent.span_id
    )


async def test_one_request_is_one_tree(mesh: tuple[Mesh, Path], spans: SpanCapture) -> None:
    running, _ = mesh
    body = await recommend(running)
    # The answer's impressions are delivered after it, in a trace of their own that links
    # to the request's ``stage.impressions`` span: straight to the event logger
    # (``impressions.deliver``), or through the outbox when a send failed (``outbox.deliver``).
    for _ in range(100):
        mine = of_trace(spans.spans, body["trace_id"])
        produced = [
            s.context for s in mine if s.name == "stage.impressions" and s.context is not None
        ]
        linked = [
            s
            for s in spans.spans
            if s.name in ("impressions.deliver", "outbox.deliver")
            and any(link.context.span_id == p.span_id for link in s.links for p in produced)
        ]
        if linked:
            break
        await asyncio.sleep(0.05)
    assert linked and all(s.parent is None for s in linked)
    root = named(mine, "POST /v1/recommend")
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert root.attributes is not None and root.attributes["recmesh.degraded"] is False
    ids = {s.context.span_id for s in mine if s.context is not None}
    assert [s.name for s in mine if s.parent is not None and s.parent.span_id not in ids] == []
    rank = "recmesh.ranking.v1.RankingService/Rank"
    server = named(mine, rank, SpanKind.SERVER)
    client = parent_of(mine, server)
    assert (client.name, client.kind) == (rank, SpanKind.CLIENT)
    assert parent_of(mine, client).name == "stage.ranking"
    for stage in ("stage.prerank", "stage.heavy", "stage.rerank"):
        assert parent_of(mine, named(mine, stage)) is server
    user_read = named(mine, "redis GET+LRANGE+LRANGE+HGET+HGETALL")
    # Retrieval reads the user from the store itself; ranking scores with the set's own
    # rows: the feature service is not on the path.
    assert parent_of(mine, user_read).name == "recmesh.retrieval.v1.RetrievalService/Retrieve"
    assert not [s for s in mine if s.name.startswith("recmesh.feature.v1.")]
    named(mine, "stage.impressions")


async def test_incoming_traceparent_is_continued(
    mesh: tuple[Mesh, Path], spans: SpanCapture
) -> None:
    running, _ = mesh
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = await recommend(running, {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert body["trace_id"] == trace_id
    root = named(of_trace(spans.spans, trace_id), "POST /v1/recommend")
    assert root.parent is not None and root.parent.span_id == 0x00F067AA0BA902B7


async def test_a_failing_downstream_marks_the_trace_degraded_and_the_call_an_error(
    mesh: tuple[Mesh, Path], spans: SpanCapture
) -> None:
    running, faults = mesh
    set_faults(running, faults, {"ranking": {"Rank": {"error_rate": 1.0, "code": "UNAVAILABLE"}}})
    try:
        body = await recommend(running)
    finally:
        set_faults(running, faults, {})
    assert body["degraded"] == ["ranking"]
    mine = of_trace(spans.spans, body["trace_id"])
    root = named(mine, "POST /v1/recommend")
    assert root.attributes is not None
    assert root.attributes["recmesh.degraded"] is True
    assert list(root.attributes["recmesh.degraded_stages"]) == ["ranking"]  # type: ignore[arg-type]
    assert root.status.status_code is StatusCode.UNSET  # answered: degraded is not an error
    stage = named(mine, "stage.ranking")
    assert stage.attributes is not None
    assert str(stage.attributes["recmesh.degraded_reason"]).startswith("ranking unavailable")
    rank = "recmesh.ranking.v1.RankingService/Rank"
    servers = [s for s in mine if s.name == rank and s.kind is SpanKind.SERVER]
    assert servers and all(s.status.status_code is StatusCode.ERROR for s in servers)
    assert all(
        s.attributes is not None
        and s.attributes["recmesh.fault_flag"] == "ranking.Rank"
        and s.attributes["recmesh.fault_injected"] is True
        for s in servers
    )
    clients = [s for s in mine if s.name == rank and s.kind is SpanKind.CLIENT]
    assert clients and all(s.status.status_code is StatusCode.ERROR for s in clients)


async def test_red_metrics_per_method(mesh: tuple[Mesh, Path]) -> None:
    running, _ = mesh
    labels = {
        "grpc_service": "recmesh.retrieval.v1.RetrievalService",
        "grpc_method": "Retrieve",
    }

    def handled() -> float:
        return (
            REGISTRY.get_sample_value(
                "recmesh_rpc_server_handled_total", {**labels, "grpc_code": "OK"}
            )
            or 0.0
        )

    def observed() -> float:
        return REGISTRY.get_sample_value("recmesh_rpc_server_handling_seconds_count", labels) or 0.0

    before = (handled(), observed())
    await recommend(running)
    assert (handled() - before[0], observed() - before[1]) == (1.0, 1.0)
    stage = REGISTRY.get_sample_value(
        "recmesh_stage_seconds_count", {"service": "gateway", "stage": "ranking"}
    )
    assert stage is not None and stage > 0
