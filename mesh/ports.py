"""Default ports of every process, the one table the settings and tooling read."""

from __future__ import annotations

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 50050,
    "feature": 50051,
    "retrieval": 50052,
    "ranking": 50053,
    "experiment": 50054,
    "events": 50055,
    "quota": 50056,
    "projector": 50057,
}

GATEWAY_HTTP_PORT = 8080

SERVICES: tuple[str, ...] = (
    "feature",
    "retrieval",
    "ranking",
    "experiment",
    "events",
    "quota",
    "projector",
)
"""Internal services, in start order (the gateway starts last)."""

DEFAULT_METRICS_PORTS: dict[str, int] = {
    "feature": 9101,
    "retrieval": 9102,
    "ranking": 9103,
    "experiment": 9104,
    "events": 9105,
    "quota": 9106,
    "projector": 9107,
}
"""Prometheus ``/metrics`` port of every service (``RECMESH_<SERVICE>_METRICS_PORT``); the
gateway serves ``/metrics`` on its HTTP API port instead."""
