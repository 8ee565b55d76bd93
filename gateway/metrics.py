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
