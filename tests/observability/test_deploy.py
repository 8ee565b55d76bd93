"""The compose stack's telemetry wiring agrees with the code: ports, metrics, policies."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY_HTTP_PORT
from mesh.tracing import DEGRADED

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_prometheus_scrapes_every_process_on_its_metrics_port() -> None:
    config = load(DEPLOY / "prometheus.yml")
    targets = {
        group["labels"]["service"]: target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    expected = {name: f"{name}:{port}" for name, port in DEFAULT_METRICS_PORTS.items()}
    assert targets == expected | {"gateway": f"gateway:{GATEWAY_HTTP_PORT}"}


def test_compose_names_every_service_and_runs_the_telemetry_stack() -> None:
    compose = load(ROOT / "docker-compose.yml")
    services = compose["services"]
    for name in DEFAULT_PORTS:
        environment = services[name]["environment"]
        assert environment["OTEL_SERVICE_NAME"] == name
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(services)
    for service in ("prometheus", "grafana", "otel-collector"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), volume


def test_collector_keeps_errors_degraded_and_slow_traces() -> None:
    config = load(DEPLOY / "otel-collector.yaml")
    policies = {p["name"]: p for p in config["processors"]["tail_sampling"]["policies"]}
    assert policies["errors"]["status_code"]["status_codes"] == ["ERROR"]
    assert policies["degraded"]["boolean_attribute"] == {"key": DEGRADED, "value": True}
    assert policies["slow"]["latency"]["threshold_ms"] == 100
    pipeline = config["service"]["pipelines"]["traces"]
    assert "tail_sampling" in pipeline["processors"]


def _exported_metric_names() -> set[str]:
    for module in (
        "gateway.server",
        "gateway.outbox",
        "mesh.client",
        "mesh.stages",
        "services.ranking.server",
        "services.projector.server",
    ):
        importlib.import_module(module)
    return {family.name for family in REGISTRY.collect()}


def test_dashboard_queries_only_metrics_the_mesh_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "recmesh.json").read_text())
    exported = _exported_metric_names()
    queried = {
        re.sub(r"_(bucket|count|sum|total)$", "", name)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"recmesh_[a-z_]+", target["expr"])
    }
    assert queried - exported == set()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("latency by stage", "qps", "errors", "degraded", "tenant"):
        assert topic in titles


def test_dashboard_is_generated_from_its_script() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_dashboard", DEPLOY / "grafana" / "make_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = json.loads((DEPLOY / "grafana" / "dashboards" / "recmesh.json").read_text())
    assert committed == json.loads(json.dumps(module.DASHBOARD))
