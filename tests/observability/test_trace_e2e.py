"""One request through the mesh started as processes is one trace, exported over OTLP.

The processes export to an OTLP/gRPC receiver this test runs (``ops.otlp_sink``), exactly
as they would to the collector. Like opentelemetry-demo's trace tests, the test checks
the trace's shape: one trace id for every service, the parent → child edges, the stage
spans and their ``recmesh.*`` attributes, and no orphan spans.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.ports import DEFAULT_PORTS, free_port
from ops import supervisor
from ops.otlp_sink import OtlpSink, ReceivedSpan
from tests.inprocess import write_tenants

pytestmark = pytest.mark.e2e

SERVICES = {"gateway", "quota", "experiment", "retrieval", "ranking"}
"""The processes a recommendation crosses (the feature service is not one: retrieval reads
the user from the store itself, and the caches of retrieval and ranking refresh from the
feature service in the background, in traces of their own)."""

Traced = tuple[dict[str, Any], list[ReceivedSpan], list[ReceivedSpan]]


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    with OtlpSink() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def layout(
    artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory, sink: OtlpSink
) -> Iterator[supervisor.Layout]:
    base = tmp_path_factory.mktemp("traced")
    mesh = supervisor.Layout(
        var_dir=base / "var",
        artifacts=artifacts_root,
        ports={name: free_port() for name in DEFAULT_PORTS},
        http_port=free_port(),
        redis_port=free_port(),
        tenants=write_tenants(base / "tenants.json"),
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
            "RECMESH_GATEWAY_DEADLINE_S": "1.0",
            "RECMESH_GATEWAY_RANKING_BUDGET_S": "0.5",
            "RECMESH_GATEWAY_RETRIEVAL_BUDGET_S": "0.4",
            "RECMESH_GATEWAY_QUOTA_BUDGET_S": "0.2",
            # Every request calls quota, so the trace under test has the quota hop even
            # when it is a retry made while an earlier request's lease is still live.
            "RECMESH_GATEWAY_QUOTA_LEASE_MAX": "1",
            "RECMESH_GATEWAY_EXPERIMENT_BUDGET_S": "0.2",
            "RECMESH_RETRIEVAL_FEATURE_BUDGET_S": "0.3",
            "RECMESH_RANKING_FEATURE_BUDGET_S": "0.3",
        },
    )
    try:
        supervisor.up(mesh, timeout_s=90)
        yield mesh
    finally:
        supervisor.down(mesh)


def recommend(layout: supervisor.Layout, request_id: str, user: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{layout.http_port}/v1/recommend",
        data=json.dumps({"user_id": user, "num_items": 10, "debug": True}).encode(),
        headers={"x-api-key": "demo-key", "x-request-id": request_id},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        body: dict[str, Any] = json.loads(response.read())
        return body


def one(spans: list[ReceivedSpan], service: str, name: str, kind: str = "") -> ReceivedSpan:
    found = [
        s for s in spans if s.service == service and s.name == name and (not kind or s.kind == kind)
    ]
    assert len(found) == 1, (service, name, kind, [(s.service, s.name) for s in spans])
    return found[0]


def edges_of(spans: list[ReceivedSpan]) -> set[tuple[str, str, str, str]]:
    """``(parent service, parent name, child service, child name)`` of every parent link."""
    by_id = {s.span_id: s for s in spans}
    return {
        (by_id[s.parent_id].service, by_id[s.parent_id].name, s.service, s.name)
        for s in spans
        if s.parent_id in by_id
    }


@pytest.fixture(scope="module")
def traced(layout: supervisor.Layout, sink: OtlpSink) -> Traced:
    """One request; its trace's spans, and the spans of the outbox delivery linked to it."""
    # The trace under test must have reached every service: on a busy machine the first
    # request after start-up can still fall back, or get a 503 (retrieval timed out before
    # the gateway's popular-items fallback was filled), so ask again (at most three times),
    # each time for another user: the gateway answers a user it has seen from its
    # assignment cache, and that trace would not reach the experiment service.
    for attempt in range(1, 4):
        try:
            body = recommend(layout, uuid.uuid4().hex, f"u{attempt}")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 3:
                raise
            time.sleep(0.5)
            continue
        if not set(body["degraded"]) & {"quota", "experiment", "retrieval", "ranking"}:
            break
    trace_id = body["trace_id"]

    def complete(spans: list[ReceivedSpan]) -> bool:
        # Every service, and the root: the gateway ends (and exports) its request span
        # after the answer is written, possibly in a later batch than its children.
        # A process exports its spans in the order they end, and a service's SERVER span
        # ends after its stage spans: once it arrived, so did that service's children.
        mine = [s for s in spans if s.trace_id == trace_id]
        services = {s.service for s in mine if s.kind == "SERVER"}
        rooted = any(not s.parent_id for s in mine)
        # The delivery of this answer's impressions (not only of its exposures, which the
        # gateway queues earlier and may deliver in another batch) reached the events service.
        stage = {s.span_id for s in mine if s.name == "stage.impressions"}
        delivered = {s.trace_id for s in spans if any(link in stage for _, link in s.links)}
        appended = [s for s in spans if s.trace_id in delivered and s.service == "events"]
        return services >= SERVICES and rooted and bool(appended)

    assert not set(body["degraded"]) & {"quota", "experiment", "retrieval", "ranking"}, body
    spans = sink.wait_for(complete, timeout_s=30)
    request_spans = [s for s in spans if s.trace_id == trace_id]
    delivery_traces = {s.trace_id for s in spans if any(t == trace_id for t, _ in s.links)}
    delivery_spans = [s for s in spans if s.trace_id in delivery_traces]
    return body, request_spans, delivery_spans


def test_one_trace_id_across_every_service(traced: Traced, sink: OtlpSink) -> None:
    body, spans, _ = traced
    assert {s.service for s in spans} == SERVICES
    # No hop started a trace of its own for this request: every span that names the
    # request id is in the request's trace.
    request_id = body["request_id"]
    named = [s for s in sink.spans() if s.attributes.get("recmesh.request_id") == request_id]
    assert {s.trace_id for s in named} == {body["trace_id"]}
    assert {s.service for s in named} == SERVICES


def test_no_orphans_and_one_root(traced: Traced) -> None:
    _, spans, delivery = traced
    for trace_spans in (spans, delivery):
        ids = {s.span_id for s in trace_spans}
        orphans = [s for s in trace_spans if s.parent_id and s.parent_id not in ids]
        assert orphans == []
        roots = [s for s in trace_spans if not s.parent_id]
        assert len(roots) == len({s.trace_id for s in trace_spans}), roots
    assert [(s.service, s.name, s.kind) for s in spans if not s.parent_id] == [
        ("gateway", "POST /v1/recommend", "SERVER")
    ]


def test_parent_child_edges(traced: Traced) -> None:
    _, spans, _ = traced
    edges = edges_of(spans)
    root = "POST /v1/recommend"
    expected = set()
    for stage, service, rpc in [
        ("quota", "quota", "recmesh.quota.v1.QuotaService/Acquire"),
        ("experiment", "experiment", "recmesh.experiment.v1.ExperimentService/Assign"),
        ("retrieval", "retrieval", "recmesh.retrieval.v1.RetrievalService/Retrieve"),
        ("ranking", "ranking", "recmesh.ranking.v1.RankingService/Rank"),
    ]:
        expected |= {
            ("gateway", root, "gateway", f"stage.{stage}"),
            ("gateway", f"stage.{stage}", "gateway", rpc),  # the CLIENT span
            ("gateway", rpc, service, rpc),  # CLIENT → SERVER across the process boundary
        }
    user = "redis GET+LRANGE+LRANGE+HGET+HGETALL"
    retrieve = "recmesh.retrieval.v1.RetrievalService/Retrieve"
    rank = "recmesh.ranking.v1.RankingService/Rank"
    # Retrieval reads the user from the store itself, and ranking scores the set's items
    # with the set's own rows: no call to the feature service on the path.
    expected |= {
        ("retrieval", retrieve, "retrieval", user),
        ("gateway", root, "gateway", "stage.impressions"),
    }
    expected |= {("retrieval", retrieve, "retrieval", f"stage.{s}") for s in ("ann", "merge")}
    expected |= {("ranking", rank, "ranking", f"stage.{s}") for s in ("prerank", "heavy", "rerank")}
    assert expected - edges == set()
    kinds = {(s.service, s.name, s.kind) for s in spans}
    assert ("gateway", root, "SERVER") in kinds
    assert ("gateway", "recmesh.quota.v1.QuotaService/Acquire", "CLIENT") in kinds
    assert ("quota", "recmesh.quota.v1.QuotaService/Acquire", "SERVER") in kinds
    assert ("retrieval", user, "CLIENT") in kinds
    assert not [s for s in spans if s.name.startswith("recmesh.feature.v1.")]
    assert [s.name for s in spans if s.error] == []


def test_stage_spans_carry_recmesh_attributes(traced: Traced) -> None:
    body, spans, _ = traced
    root = one(spans, "gateway", "POST /v1/recommend")
    assert root.attributes["recmesh.tenant"] == "demo"
    assert root.attributes["recmesh.request_id"] == body["request_id"]
    assert root.attributes["recmesh.degraded"] is False
    assert root.attributes["recmesh.items"] == 10
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["recmesh.experiments"] == [
        f"{e['key']}={e['variant']}" for e in body["experiments"]
    ]
    retrieval = one(spans, "gateway", "stage.retrieval")
    assert retrieval.attributes["recmesh.stage"] == "retrieval"
    assert retrieval.attributes["recmesh.budget_ms"] == 400.0
    assert retrieval.attributes["recmesh.candidates_out"] > 0
    assert retrieval.attributes["recmesh.breaker_state"] == "closed"
    ranking = one(spans, "gateway", "stage.ranking")
    assert ranking.attributes["recmesh.candidates_out"] == 10
    assert (
        ranking.attributes["recmesh.candidates_in"]
        == retrieval.attributes["recmesh.candidates_out"]
    )
    prerank = one(spans, "ranking", "stage.prerank")
    assert (
        prerank.attributes["recmesh.candidates_in"] >= prerank.attributes["recmesh.candidates_out"]
    )
    assert prerank.attributes["recmesh.candidates_out"] > 0
    assert one(spans, "ranking", "stage.rerank").attributes["recmesh.candidates_out"] == 10
    server = one(spans, "ranking", "recmesh.ranking.v1.RankingService/Rank", "SERVER")
    assert server.attributes["recmesh.tenant"] == "demo"
    assert server.attributes["recmesh.request_id"] == body["request_id"]
    # At most the caller's 500 ms budget; the grpc-timeout header may round it up a little.
    assert 0 < server.attributes["recmesh.deadline_ms"] <= 501
    assert server.attributes["rpc.grpc.status_code"] == 0
    # Stage spans sit inside their parent's time.
    for stage in ("stage.prerank", "stage.heavy", "stage.rerank"):
        child = one(spans, "ranking", stage)
        assert server.start_ns <= child.start_ns <= child.end_ns <= server.end_ns


def test_impression_delivery_is_a_linked_trace(traced: Traced) -> None:
    body, spans, delivery = traced
    impressions = one(spans, "gateway", "stage.impressions")
    deliver = [s for s in delivery if s.name == "impressions.deliver"]
    assert deliver and all(not s.parent_id for s in deliver)
    assert any((body["trace_id"], impressions.span_id) in s.links for s in deliver)
    append = "recmesh.events.v1.EventService/Append"
    assert {
        ("gateway", "impressions.deliver", "gateway", append),
        ("gateway", append, "events", append),
    } <= edges_of(delivery)


def test_resource_attributes_from_the_environment(traced: Traced) -> None:
    _, spans, _ = traced
    for span in spans:
        assert span.resource["service.namespace"] == "recmesh"
        assert span.resource["deployment.environment.name"] == "test"  # OTEL_RESOURCE_ATTRIBUTES
