"""Prometheus metrics of the gateway, served on ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)

REQUESTS = Counter(
    "recmesh_gateway_requests_total",
    "Requests answered by the gateway, by API, route, tenant and status code",
    ["api", "route", "tenant", "code"],
)
LATENCY = Histogram(
    "recmesh_gateway_request_seconds",
    "Gateway request latency by API and route",
    ["api", "route"],
    buckets=LATENCY_BUCKETS,
)
DEGRADED = Counter(
    "recmesh_gateway_degraded_total",
    "Requests answered with a stage fallen back, by stage and tenant",
    ["stage", "tenant"],
)
STAGE_SECONDS = Histogram(
    "recmesh_gateway_stage_seconds",
    "Time of each funnel stage as the gateway sees it (quota, experiment, retrieval, ranking)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
QUOTA_DECISIONS = Counter(
    "recmesh_gateway_quota_decisions_total",
    "Quota answers per tenant: allowed, denied, or unavailable (quota service down)",
    ["tenant", "decision"],
)
QUOTA_SOURCES = Counter(
    "recmesh_gateway_quota_sources_total",
    "Quota decisions per tenant by where they came from: a quota call, a leased token, "
    "or a remembered denial (gateway/quota.py)",
    ["tenant", "source"],
)
ASSIGNMENT_CACHE = Counter(
    "recmesh_gateway_assignment_cache_total",
    "Experiment assignments looked up in the gateway's cache: hit, or miss (the experiment "
    "service was asked; gateway/assignments.py)",
    ["result"],
)
IMPRESSIONS = Counter(
    "recmesh_gateway_impressions_total",
    "Impressions of answers by route: sent straight to the event logger, stored in the outbox "
    "(delivery failed or the outbox held rows), or lost (the outbox could not store them)",
    ["route"],
)
