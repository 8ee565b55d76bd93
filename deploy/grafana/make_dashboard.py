"""Writes ``dashboards/recmesh.json``, the provisioned Grafana dashboard.

The JSON is generated so panels stay uniform; edit the panel list here and run
``python deploy/grafana/make_dashboard.py``. ``tests/observability/test_deploy.py`` checks
that every metric the dashboard queries is one the mesh exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "prometheus"}
RATE = "[$__rate_interval]"


def panel(
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    width: int = 8,
    exemplars: bool = False,
) -> dict[str, Any]:
    legend = {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull"]}
    return {
        "type": "timeseries",
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": width},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": legend},
        "targets": [
            {
                "refId": chr(65 + n),
                "expr": expr,
                "legendFormat": legend_format,
                "exemplar": exemplars,
                "datasource": DS,
            }
            for n, (expr, legend_format) in enumerate(targets)
        ],
    }


def row(title: str) -> dict[str, Any]:
    grid = {"h": 1, "w": 24}
    return {"type": "row", "title": title, "collapsed": False, "gridPos": grid, "panels": []}


def _match(selector: str) -> str:
    return f"{{{selector}}}" if selector else ""


def rate_by(metric: str, by: str, selector: str = "") -> tuple[str, str]:
    """``sum by (<by>) (rate(<metric>{<selector>}[..]))`` with a legend of the labels."""
    legend = " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(","))
    return f"sum by ({by}) (rate({metric}{_match(selector)}{RATE}))", legend


def quantile(q: float, metric: str, by: str = "", selector: str = "") -> tuple[str, str]:
    """``histogram_quantile`` of ``<metric>_bucket`` by ``le`` and ``by``."""
    labels = f"le, {by}" if by else "le"
    rate = f"rate({metric}_bucket{_match(selector)}{RATE})"
    expr = f"histogram_quantile({q}, sum by ({labels}) ({rate}))"
    legend = " ".join([f"p{round(q * 100)}", *(f"{{{{{b.strip()}}}}}" for b in by.split(",") if b)])
    return expr, legend


SERVER_ERRORS = 'code=~"5..|INTERNAL|UNAVAILABLE|UNKNOWN|DEADLINE_EXCEEDED"'

PANELS = [
    row("Requests"),
    panel(
        "Gateway QPS by route and status",
        [rate_by("recmesh_gateway_requests_total", "api, route, code")],
        unit="reqps",
    ),
    panel(
        "Gateway errors (5xx and gRPC server errors) / all",
        [
            (
                f"sum(rate(recmesh_gateway_requests_total{{{SERVER_ERRORS}}}{RATE}))"
                f" / sum(rate(recmesh_gateway_requests_total{RATE}))",
                "error ratio",
            )
        ],
        unit="percentunit",
    ),
    panel(
        "Recommendation latency (click an exemplar for its trace)",
        [
            quantile(q, "recmesh_gateway_request_seconds", selector='route="/v1/recommend"')
            for q in (0.5, 0.95, 0.99)
        ],
        unit="s",
        exemplars=True,
    ),
    row("Funnel"),
    panel(
        "Funnel latency by stage, p95 (gateway view)",
        [quantile(0.95, "recmesh_stage_seconds", "stage", 'service="gateway"')],
        unit="s",
        width=12,
        exemplars=True,
    ),
    panel(
        "Stage latency inside services, p95",
        [quantile(0.95, "recmesh_stage_seconds", "service, stage", 'service!="gateway"')],
        unit="s",
        width=12,
    ),
    panel(
        "Degraded answers by stage",
        [rate_by("recmesh_gateway_degraded_total", "stage")],
        unit="reqps",
    ),
    panel(
        "Circuit breakers (0 closed, 1 half-open, 2 open)",
        [("max by (downstream) (recmesh_breaker_state)", "{{downstream}}")],
    ),
    panel(
        "Downstream attempts by code, retries, rejections",
        [
            rate_by("recmesh_downstream_attempts_total", "downstream, code"),
            rate_by("recmesh_downstream_retries_total", "downstream"),
            rate_by("recmesh_downstream_rejected_total", "downstream, reason"),
        ],
        unit="reqps",
    ),
    row("Event log projections"),
    panel(
        "Projector lag by tenant: entries not yet read, age of the oldest (s)",
        [
            ("max by (tenant) (recmesh_projector_lag_events)", "{{tenant}} entries"),
            ("max by (tenant) (recmesh_projector_lag_seconds)", "{{tenant}} seconds"),
        ],
        width=12,
    ),
    panel(
        "Projected events by outcome (applied, duplicate, dead)",
        [rate_by("recmesh_projector_events_total", "tenant, outcome")],
        unit="ops",
        width=12,
    ),
    row("gRPC methods (RED)"),
    panel(
        "Rate by method",
        [rate_by("recmesh_rpc_server_handled_total", "service, grpc_method")],
        unit="reqps",
    ),
    panel(
        "Errors by method and code",
        [
            rate_by(
                "recmesh_rpc_server_handled_total",
                "service, grpc_method, grpc_code",
                'grpc_code!="OK"',
            )
        ],
        unit="reqps",
    ),
    panel(
        "Duration by method, p99",
        [quantile(0.99, "recmesh_rpc_server_handling_seconds", "service, grpc_method")],
        unit="s",
        exemplars=True,
    ),
    row("Tenants, events, caches"),
    panel(
        "Requests per tenant",
        [rate_by("recmesh_gateway_requests_total", "tenant")],
        unit="reqps",
    ),
    panel(
        "Quota decisions per tenant",
        [rate_by("recmesh_gateway_quota_decisions_total", "tenant, decision")],
        unit="reqps",
    ),
    panel(
        "Degraded answers per tenant",
        [rate_by("recmesh_gateway_degraded_total", "tenant")],
        unit="reqps",
    ),
    panel(
        "Quota decisions by source (call, leased token, remembered denial)",
        [rate_by("recmesh_gateway_quota_sources_total", "source")],
        unit="reqps",
    ),
    panel(
        "Experiment assignment cache (hit, miss)",
        [rate_by("recmesh_gateway_assignment_cache_total", "result")],
        unit="reqps",
    ),
    panel(
        "Impressions by route (sent, outbox, lost)",
        [rate_by("recmesh_gateway_impressions_total", "route")],
        unit="reqps",
    ),
    panel(
        "Outbox depth (events accepted, not yet delivered)",
        [("sum(recmesh_gateway_outbox_depth)", "depth")],
        width=12,
    ),
    panel(
        "Ranking item-feature cache hit ratio",
        [("max(recmesh_ranking_item_cache_hit_ratio)", "hit ratio")],
        unit="percentunit",
        width=12,
    ),
]


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at 24 columns; give each an id."""
    x = y = 0
    height = 0
    for n, item in enumerate(panels, start=1):
        grid = item["gridPos"]
        if item["type"] == "row" or x + grid["w"] > 24:
            y, x = y + height, 0
            height = 0
        grid.update(x=x, y=y)
        item["id"] = n
        if item["type"] == "row":
            y += grid["h"]
        else:
            x += grid["w"]
            height = max(height, grid["h"])
    return panels


DASHBOARD = {
    "uid": "recmesh-overview",
    "title": "RecMesh",
    "tags": ["recmesh"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "10s",
    "time": {"from": "now-30m", "to": "now"},
    "templating": {"list": []},
    "links": [
        {"title": "Jaeger", "type": "link", "url": "http://127.0.0.1:16686", "targetBlank": True}
    ],
    "panels": layout(PANELS),
}

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "dashboards" / "recmesh.json"
    out.write_text(json.dumps(DASHBOARD, indent=2) + "\n")
    print(f"wrote {out}")
