"""The request metrics both public APIs (HTTP and gRPC) count into, served on ``GET /metrics``.

Metrics of one part of the gateway live in that part's module (the funnel's, the
impression shipper's, the outbox's); these two are shared by :mod:`gateway.http` and
:mod:`gateway.grpc_api`.
"""

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

REFUSAL_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.1,
)  # fmt: skip
REFUSALS = Histogram(
    "recmesh_gateway_refusal_seconds",
    "Time the HTTP API took to refuse a request over its tenant's quota (429) or over the "
    "gateway's capacity (503), from the route's middleware to the answer, by status",
    ["api", "status"],
    buckets=REFUSAL_BUCKETS,
)
