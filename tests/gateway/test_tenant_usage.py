"""Usage and cost per tenant through the whole mesh in-process: recommendations of two
tenants with different traffic, then GetUsage and the metrics (docs/usage.md)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from prometheus_client import REGISTRY
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from mesh.client import open_channel
from tests.inprocess import Mesh, accepted

KEYS = {"demo": "demo-key", "acme": "acme-key"}


def scored_in(stages: list[dict[str, Any]]) -> Counter[str]:
    """Candidates each ranking stage scored, as one answer's debug stages report them."""
    scored: Counter[str] = Counter()
    for stage in stages:
        if stage["stage"] in ("prerank", "heavy") and "scored" in stage["details"]:
            scored[stage["stage"]] += int(stage["details"]["scored"])
        elif stage["stage"] == "rerank":
            scored["rerank"] += stage["candidates_in"]
    return scored


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def cpu_metric(service: str, tenant: str) -> float:
    return metric("recmesh_tenant_cpu_seconds_total", service=service, tenant=tenant)


def scored_metric(tenant: str, stage: str) -> float:
    return metric("recmesh_tenant_candidates_scored_total", tenant=tenant, stage=stage)


async def usage(mesh: Mesh) -> dict[str, quota_pb2.TenantUsage]:
    async with open_channel(mesh.addr("quota")) as channel:
        reply = await quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(quota_pb2.GetUsageRequest())
    return {row.tenant: row for row in reply.usage}


async def recommend(mesh: Mesh, tenant: str, n: int) -> Counter[str]:
    """``n`` debug recommendations of ``tenant``; the candidates they say ranking scored."""
    scored: Counter[str] = Counter()
    for i in range(n):
        body = await accepted(
            mesh,
            "/v1/recommend",
            {"user_id": f"u{i + 7}", "num_items": 5, "debug": True},
            api_key=KEYS[tenant],
        )
        scored += scored_in(body["stages"])
    return scored


async def costed(mesh: Mesh, tenant: str, at_least: int) -> dict[str, quota_pb2.TenantUsage]:
    """The usage once ``tenant``'s costed requests reached ``at_least`` (the gateway flushes
    every second)."""
    deadline = time.monotonic() + 10.0
    while True:
        rows = await usage(mesh)
        if rows[tenant].costed_requests >= at_least or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_get_usage_shows_each_tenants_requests_candidates_scored_and_cpu(
    mesh: Mesh,
) -> None:
    left_in_hour = 3600 - time.time() % 3600
    if left_in_hour < 30:  # the figures are the current hour's: keep the test inside one
        await asyncio.sleep(left_in_hour + 0.5)
    before = await usage(mesh)
    cpu_before = {s: cpu_metric(s, "demo") for s in ("retrieval", "ranking")}
    stages = ("prerank", "heavy", "rerank")
    scored_before = {s: scored_metric("demo", s) for s in stages}

    demo_scored = await recommend(mesh, "demo", 6)
    after_demo = await costed(mesh, "demo", before["demo"].costed_requests + 6)
    demo, acme = after_demo["demo"], after_demo["acme"]
    assert demo.costed_requests - before["demo"].costed_requests == 6
    # One quota unit per request (the in-process gateway leases one at a time).
    assert demo.allowed - before["demo"].allowed == 6
    assert demo.candidates_scored - before["demo"].candidates_scored == sum(demo_scored.values())
    assert demo_scored["prerank"] > 0 and demo_scored["rerank"] > 0
    for stage, count in demo_scored.items():
        was = before["demo"].candidates_scored_by_stage.get(stage, 0)
        assert demo.candidates_scored_by_stage[stage] - was == count
    assert demo.retrieval_cpu_ms > before["demo"].retrieval_cpu_ms
    assert demo.ranking_cpu_ms > before["demo"].ranking_cpu_ms
    assert acme == before["acme"]  # the other tenant's figures did not move
    # The same figures in the metrics, counted where they were spent.
    for stage in stages:
        assert scored_metric("demo", stage) - scored_before[stage] == demo_scored[stage]
    for service in ("retrieval", "ranking"):
        assert cpu_metric(service, "demo") > cpu_before[service]

    acme_scored = await recommend(mesh, "acme", 3)
    after_acme = await costed(mesh, "acme", before["acme"].costed_requests + 3)
    assert after_acme["acme"].costed_requests - before["acme"].costed_requests == 3
    assert after_acme["acme"].allowed - before["acme"].allowed == 3
    assert after_acme["acme"].candidates_scored - before["acme"].candidates_scored == sum(
        acme_scored.values()
    )
    assert after_acme["acme"].retrieval_cpu_ms > before["acme"].retrieval_cpu_ms
    assert after_acme["acme"].ranking_cpu_ms > before["acme"].ranking_cpu_ms
    assert after_acme["demo"] == demo  # and now demo's did not
    # A request's CPU is milliseconds, not seconds: the figures are per request, not shared.
    per_request = (demo.ranking_cpu_ms - before["demo"].ranking_cpu_ms) / 6
    assert 0.01 < per_request < 1000
