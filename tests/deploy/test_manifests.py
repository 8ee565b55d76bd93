"""Offline checks of the deployment files, without a cluster or a Docker engine.

- Every Kubernetes manifest under ``deploy/k8s/`` (the on-demand Jobs in ``jobs/``
  included) validates against the API schemas of :data:`KUBERNETES_VERSION`, strictly (an
  unknown or misspelt field fails), with ``kubernetes-validate``.
- The manifests agree with each other (probes, Services, selectors, NetworkPolicies,
  ConfigMaps, Secrets, volumes) and with the code: the processes ``recmesh up`` starts, their
  ports, the environment variables their settings classes read, the call graph those
  settings imply, the CPU per request measured in ``docs/performance.md``.
- ``docker-compose.yml`` validates against the Compose specification's JSON schema (vendored
  beside this file, see README.md) and agrees with the code the same way.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import importlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY_HTTP_PORT
from ops.processes import MODULES
from ops.settings import OpsSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
HERE = Path(__file__).resolve().parent

KUBERNETES_VERSION = "1.35.0"
"""The Kubernetes release whose API schemas the manifests are validated against."""

NAMESPACE = "recmesh"
NAME = "app.kubernetes.io/name"

COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
"""Checksum of ``compose-spec.json`` as its source package ships it (README.md)."""

DESIGN_RATE = 50
"""Recommendations per second each mesh pod's CPU request is sized for (docs/kubernetes.md)."""

CPU_FLOOR_M = 100
"""The least CPU request of a mesh process, in millicores: its loop, health checks, metrics."""

HPA_TARGET = 70
"""The HPAs' CPU utilisation target, percent of the request."""

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
CLUSTER_SCOPED = {"Namespace"}
CALLS_WITHOUT_SETTINGS = {"materialize": {"feature"}}
"""Callers that are not mesh processes: the materialize Job's script reads
``RECMESH_FEATURE_ADDR`` itself (checked against its environment too)."""


# ---- loading -------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """One object of one file under deploy/k8s."""

    path: Path
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        meta = self.body["metadata"]
        return str(meta.get("name") or meta["generateName"].rstrip("-"))

    @property
    def where(self) -> str:
        return f"deploy/k8s/{self.path.relative_to(K8S)}: {self.kind}/{self.name}"


def manifest_files() -> list[Path]:
    """Every Kubernetes YAML file under deploy/k8s (not kustomize's own file)."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@cache
def manifests() -> tuple[Manifest, ...]:
    found = []
    for path in manifest_files():
        for body in yaml.safe_load_all(path.read_text()):
            if body:
                found.append(Manifest(path, body))
    return tuple(found)


def objects(kind: str) -> list[Manifest]:
    return [m for m in manifests() if m.kind == kind]


def one(kind: str, name: str) -> Manifest:
    matches = [m for m in objects(kind) if m.name == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads() -> list[Manifest]:
    return [m for m in manifests() if m.kind in WORKLOAD_KINDS]


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload.body["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload.body["spec"]["template"]["metadata"]["labels"]
    return labels


def app(workload: Manifest) -> str:
    """What the workload runs: its pods' ``app.kubernetes.io/name`` (a Deployment's or
    StatefulSet's own name; ``train`` for the Jobs named ``recmesh-train-...``)."""
    return pod_labels(workload)[NAME]


def containers(workload: Manifest, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    found: list[dict[str, Any]] = list(spec["containers"])
    if init:
        found += spec.get("initContainers", [])
    return found


def main_container(workload: Manifest) -> dict[str, Any]:
    """The container named after what its workload runs (every workload here has one)."""
    (container,) = [c for c in pod_spec(workload)["containers"] if c["name"] == app(workload)]
    found: dict[str, Any] = container
    return found


def pod_volumes(workload: Manifest) -> dict[str, dict[str, Any]]:
    """The volumes a pod of ``workload`` can mount, by name: its own and, for a
    StatefulSet, one claim per volumeClaimTemplate."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for template in workload.body["spec"].get("volumeClaimTemplates", []):
        name = template["metadata"]["name"]
        volumes[name] = {"name": name, "persistentVolumeClaim": {"claimName": None}}
    return volumes


def container_ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}


def plain_env(container: Mapping[str, Any]) -> dict[str, str]:
    """The container's variables with literal values."""
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def env_names(container: Mapping[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels / matchExpressions) selects
    ``labels``. An empty selector selects everything."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def selected(selector: Mapping[str, Any]) -> list[Manifest]:
    """The workloads whose pods ``selector`` selects."""
    return [w for w in workloads() if matches(selector, pod_labels(w))]


def quantity(text: str | int | float) -> Fraction:
    """A Kubernetes quantity (``500m``, ``1``, ``256Mi``, ``2Gi``) as a number."""
    raw = str(text)
    suffixes: dict[str, Fraction] = {
        "m": Fraction(1, 1000),
        "Ki": Fraction(2**10),
        "Mi": Fraction(2**20),
        "Gi": Fraction(2**30),
        "Ti": Fraction(2**40),
    }
    for suffix, factor in suffixes.items():
        if raw.endswith(suffix):
            return Fraction(raw[: -len(suffix)]) * factor
    return Fraction(raw)


# ---- the code's view: processes, their settings, what they read ----------------------


def settings_class_of(process: str) -> type[Any]:
    """The settings class ``python -m <module>`` of ``process`` loads, read from its
    ``__main__.py``: ``run_service(build_service, <SettingsClass>)``, the class resolved
    through the file's imports. Running through ``mesh.runner.run_service`` is also what
    gives the process its ``grpc.health.v1`` service (``mesh.server.MeshServer``)."""
    module = MODULES[process]
    source = ROOT / Path(*module.split(".")) / "__main__.py"
    tree = ast.parse(source.read_text())
    imported = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "run_service"
    ]
    assert len(calls) == 1, f"{source}: expected one run_service(...) call"
    assert imported.get("run_service") == "mesh.runner", f"{source}: run_service is not mesh's"
    argument = calls[0].args[1]
    assert isinstance(argument, ast.Name), f"{source}: settings class is not a plain name"
    cls: type[Any] = getattr(importlib.import_module(imported[argument.id]), argument.id)
    return cls


def settings_env(cls: type[Any]) -> set[str]:
    """Every environment variable the settings dataclass ``cls`` reads."""
    return {f.metadata["env"] for f in dataclasses.fields(cls) if "env" in f.metadata}


@cache
def process_env(process: str) -> frozenset[str]:
    return frozenset(settings_env(settings_class_of(process)))


@cache
def every_settings_env() -> frozenset[str]:
    """What any settings class of a process or of the ``recmesh`` tooling reads."""
    names = set(settings_env(OpsSettings))
    for process in MODULES:
        names |= process_env(process)
    return frozenset(names)


@cache
def otel_names_read() -> frozenset[str]:
    """The OTEL_* variables ``mesh/telemetry.py`` reads or documents as honoured."""
    text = (ROOT / "mesh" / "telemetry.py").read_text()
    return frozenset(re.findall(r"\bOTEL_[A-Z_]*[A-Z]\b", text))


def unread(names: set[str], known: frozenset[str]) -> set[str]:
    """The names among ``names`` that neither ``known`` nor the telemetry reads."""
    return {n for n in names if n not in known and n not in otel_names_read()}


def callees(process: str) -> set[str]:
    """The processes ``process`` calls: those whose ``RECMESH_<NAME>_ADDR`` it reads."""
    return {p for p in MODULES if f"RECMESH_{p.upper()}_ADDR" in process_env(process)}


def uses_redis(process: str) -> bool:
    return "REDIS_URL" in process_env(process)


# ---- Kubernetes: schemas and layout --------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates_against_the_pinned_kubernetes_schemas(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents, f"{path}: no Kubernetes object"
    failures = []
    for document in documents:
        where = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{where}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_the_schema_validation_refuses_a_misspelt_field_and_a_wrong_type() -> None:
    gateway = one("Deployment", "gateway").body
    kubernetes_validate.validate(gateway, KUBERNETES_VERSION, strict=True)

    misspelt = copy.deepcopy(gateway)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)

    wrong_type = copy.deepcopy(gateway)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = (
        "grpc"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)

    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_on_demand_jobs() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    top_level = {p.name for p in manifest_files() if p.parent == K8S}
    assert set(listed) == top_level
    on_demand = [m for m in manifests() if m.path.parent != K8S]
    assert {m.name for m in on_demand} == {"recmesh-train", "recmesh-materialize"}
    for manifest in on_demand:
        # `kubectl create -f` makes a new Job each run; apply would refuse generateName.
        assert manifest.kind == "Job", manifest.where
        assert "generateName" in manifest.body["metadata"], manifest.where
        assert "name" not in manifest.body["metadata"], manifest.where


def test_objects_are_unique_and_live_in_the_namespace() -> None:
    seen: dict[tuple[str, str], str] = {}
    for manifest in manifests():
        key = (manifest.kind, manifest.name)
        assert key not in seen, f"{manifest.where} repeats {seen[key]}"
        seen[key] = manifest.where
        namespace = manifest.body["metadata"].get("namespace")
        if manifest.kind in CLUSTER_SCOPED:
            assert namespace is None, manifest.where
        else:
            assert namespace == NAMESPACE, manifest.where
    assert one("Namespace", NAMESPACE)


# ---- Kubernetes: the processes of the mesh -------------------------------------------


def test_every_process_recmesh_up_starts_is_a_deployment_on_its_public_ports() -> None:
    deployments = {m.name for m in objects("Deployment")}
    assert set(MODULES) <= deployments, f"no Deployment for {set(MODULES) - deployments}"
    for process, module in MODULES.items():
        deployment = one("Deployment", process)
        container = main_container(deployment)
        assert container["command"] == ["python", "-m", module], deployment.where
        ports = container_ports(container)
        assert ports["grpc"] == DEFAULT_PORTS[process], deployment.where
        expected_ports = {"grpc", "health"}
        if process == "gateway":
            assert ports["http"] == GATEWAY_HTTP_PORT, deployment.where
            expected_ports.add("http")
        else:
            assert ports["metrics"] == DEFAULT_METRICS_PORTS[process], deployment.where
            expected_ports.add("metrics")
        assert set(ports) == expected_ports, deployment.where
        env = plain_env(container)
        # Bound to the pod's address, not the settings' default of 127.0.0.1.
        assert env.get("RECMESH_HOST") == "0.0.0.0", deployment.where
        port_names = {
            f"RECMESH_{process.upper()}_PORT": "grpc",
            f"RECMESH_{process.upper()}_METRICS_PORT": "metrics",
            "RECMESH_GATEWAY_HTTP_PORT": "http",
            "RECMESH_HEALTH_PORT": "health",
        }
        for variable, port_name in port_names.items():
            if variable in env:
                assert int(env[variable]) == ports[port_name], f"{deployment.where}: {variable}"
        scrape = deployment.body["spec"]["template"]["metadata"]["annotations"]
        assert (
            int(scrape["prometheus.io/port"])
            == ports["http" if process == "gateway" else "metrics"]
        )


def probes(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    return {kind: container[kind] for kind in kinds if kind in container}


def test_every_probe_names_a_port_its_container_has() -> None:
    for workload in workloads():
        for container in containers(workload):
            ports = container_ports(container)
            for kind, probe in probes(container).items():
                where = f"{workload.where}: {container['name']}.{kind}"
                handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
                if handler is None:
                    assert "exec" in probe, where
                    continue
                port = handler["port"]
                if isinstance(port, str):
                    assert port in ports, f"{where}: no port named {port!r}"
                else:
                    assert port in ports.values(), f"{where}: no container port {port}"
        if workload.kind != "Job":
            for container in pod_spec(workload)["containers"]:
                kinds = probes(container)
                assert {"readinessProbe", "livenessProbe"} <= set(kinds), workload.where


def test_mesh_processes_are_probed_on_their_grpc_health_and_the_gateway_on_healthz() -> None:
    for process in MODULES:
        deployment = one("Deployment", process)
        container = main_container(deployment)
        # The gRPC port requires a client certificate, which the kubelet's probes cannot
        # present: they ask the plaintext health port (RECMESH_HEALTH_PORT), which serves
        # the same grpc.health.v1 status and nothing else.
        health_port = container_ports(container)["health"]
        assert int(plain_env(container)["RECMESH_HEALTH_PORT"]) == health_port
        for kind in ("startupProbe", "readinessProbe"):
            if process == "gateway" and kind == "startupProbe":
                continue
            assert container[kind]["grpc"]["port"] == health_port, f"{deployment.where}: {kind}"
        # Liveness must not follow dependencies (the gRPC health does): a Valkey outage
        # would otherwise restart every pod of the mesh.
        assert "grpc" not in container["livenessProbe"], deployment.where
    gateway = main_container(one("Deployment", "gateway"))
    http_probes = [p["httpGet"] for p in probes(gateway).values() if "httpGet" in p]
    assert {"path": "/healthz", "port": "http"} in http_probes
    assert container_ports(gateway)["http"] == GATEWAY_HTTP_PORT


def tls_mount(workload: Manifest, container: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Where ``container`` reads its certificates (RECMESH_TLS_DIR) and the Secret volume
    mounted there."""
    directory = plain_env(container)["RECMESH_TLS_DIR"]
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert directory in mounts, f"{workload.where}: nothing mounted at RECMESH_TLS_DIR"
    assert mounts[directory].get("readOnly"), workload.where
    volume = pod_volumes(workload)[mounts[directory]["name"]]
    assert "secret" in volume, f"{workload.where}: certificates not from a Secret"
    return directory, volume["secret"]


def test_each_process_mounts_its_own_identity_and_the_ca_only() -> None:
    """mTLS: a pod holds its own certificate and key (named as ``mesh.tls`` reads them:
    ca.crt, <identity>.crt, <identity>.key) and no other identity's."""
    jobs = {job.name: job for job in objects("Job")}
    checked = [(one("Deployment", process), process) for process in MODULES]
    checked += [
        (job, "ops")
        for job in jobs.values()
        if "RECMESH_FEATURE_ADDR" in env_names(main_container(job))
    ]
    assert any(identity == "ops" for _, identity in checked), "the materialize Job"
    for workload, identity in checked:
        container = main_container(workload)
        assert plain_env(container).get("RECMESH_TLS", "on") != "off", workload.where
        if workload.kind == "Job":  # a tool; a process presents its own name
            assert plain_env(container).get("RECMESH_TLS_IDENTITY", "ops") == identity
        _, secret = tls_mount(workload, container)
        assert secret["secretName"] == f"recmesh-tls-{identity}", workload.where
        paths = {item["key"]: item["path"] for item in secret["items"]}
        assert paths == {
            "ca.crt": "ca.crt",
            "tls.crt": f"{identity}.crt",
            "tls.key": f"{identity}.key",
        }, workload.where
        assert data_keys(one("Secret", secret["secretName"])) == set(paths), workload.where
        assert one("Secret", secret["secretName"]).body["type"] == "kubernetes.io/tls"


def test_the_grpc_ingress_presents_the_edge_identity_to_the_gateway() -> None:
    annotations = one("Ingress", "gateway-grpc").body["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "backend-protocol"] == "GRPCS"
    namespace, name = annotations[prefix + "proxy-ssl-secret"].split("/")
    assert namespace == NAMESPACE and one("Secret", name).body["type"] == "kubernetes.io/tls"
    assert "ca.crt" in data_keys(one("Secret", name))
    assert annotations[prefix + "proxy-ssl-name"] == "gateway"


def test_termination_grace_outlasts_pre_stop_and_drain() -> None:
    for process in MODULES:
        deployment = one("Deployment", process)
        container = main_container(deployment)
        defaults = settings_class_of(process)()
        env = plain_env(container)
        delay = float(env.get("RECMESH_DRAIN_DELAY_S", defaults.drain_delay_s))
        grace = float(env.get("RECMESH_DRAIN_GRACE_S", defaults.drain_grace_s))
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        budget = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert budget > pre_stop + delay + grace, deployment.where


# ---- Kubernetes: selectors, Services, autoscaling, disruption ------------------------


def test_workload_selectors_select_their_own_pods() -> None:
    for workload in workloads():
        labels = pod_labels(workload)
        expected = f"recmesh-{app(workload)}" if workload.kind == "Job" else app(workload)
        assert workload.name == expected, workload.where
        assert workload.body["metadata"]["labels"][NAME] == app(workload), workload.where
        assert labels.get("app.kubernetes.io/part-of") == "recmesh", workload.where
        if workload.kind != "Job":
            selector = workload.body["spec"]["selector"]
            assert selector["matchLabels"], workload.where
            assert matches(selector, labels), workload.where
            assert selected(selector) == [workload], f"{workload.where}: selector is not unique"
        for constraint in pod_spec(workload).get("topologySpreadConstraints", []):
            assert matches(constraint["labelSelector"], labels), workload.where


def test_every_service_selects_one_workload_and_targets_ports_it_has() -> None:
    for service in objects("Service"):
        selector = {"matchLabels": service.body["spec"]["selector"]}
        targets = selected(selector)
        assert len(targets) == 1, f"{service.where} selects {[t.name for t in targets]}"
        ports: dict[str, int] = {}
        for container in pod_spec(targets[0])["containers"]:
            ports |= container_ports(container)
        for port in service.body["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in ports, f"{service.where}: no container port named {target}"
            else:
                assert target in ports.values(), f"{service.where}: no container port {target}"
    for statefulset in objects("StatefulSet"):
        governing = one("Service", statefulset.body["spec"]["serviceName"])
        assert governing.body["spec"].get("clusterIP") == "None", governing.where


def test_stateless_processes_autoscale_on_cpu_and_have_disruption_budgets() -> None:
    hpas = {m.body["spec"]["scaleTargetRef"]["name"]: m for m in objects("HorizontalPodAutoscaler")}
    # The projector's work follows events and is bounded by Valkey, not by its CPU.
    assert set(hpas) == set(MODULES) - {"projector"}
    for name, hpa in hpas.items():
        deployment = one("Deployment", name)
        assert hpa.body["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert "replicas" not in deployment.body["spec"], f"{deployment.where}: HPA owns it"
        assert hpa.body["spec"]["minReplicas"] >= 2, hpa.where
        assert hpa.body["spec"]["maxReplicas"] > hpa.body["spec"]["minReplicas"], hpa.where
        (metric,) = hpa.body["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu", hpa.where
        assert metric["resource"]["target"]["averageUtilization"] == HPA_TARGET, hpa.where
        for container in pod_spec(deployment)["containers"]:
            assert "cpu" in container["resources"]["requests"], deployment.where
    budgets = objects("PodDisruptionBudget")
    for process in MODULES:
        deployment = one("Deployment", process)
        covering = [b for b in budgets if selected(b.body["spec"]["selector"]) == [deployment]]
        assert len(covering) == 1, f"{deployment.where}: {len(covering)} PodDisruptionBudgets"
        assert covering[0].body["spec"]["maxUnavailable"] == 1
    for budget in budgets:
        assert selected(budget.body["spec"]["selector"]), f"{budget.where} selects no pod"


# ---- Kubernetes: resources -----------------------------------------------------------


def measured_cpu_ms() -> dict[str, float]:
    """CPU per recommendation by process, ms: the table of docs/performance.md's
    "Where the mesh's CPU goes" (``| process | ms | ... |``)."""
    text = (ROOT / "docs" / "performance.md").read_text()
    section = text.split("## Where the mesh's CPU goes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([A-Za-z]+) \| ([0-9.]+) \|", section, re.MULTILINE)
    assert rows, "docs/performance.md: no `| process | ms |` table in its CPU section"
    return {name: float(ms) for name, ms in rows}


def design_cpu_m(ms_per_request: float) -> int:
    """The CPU request, millicores, for :data:`DESIGN_RATE` recommendations/s at
    ``ms_per_request``: rounded to 50m, at least :data:`CPU_FLOOR_M`."""
    return max(CPU_FLOOR_M, round(ms_per_request * DESIGN_RATE / 50) * 50)


def test_design_cpu_arithmetic() -> None:
    assert design_cpu_m(10.1) == 500  # 505m
    assert design_cpu_m(4.7) == 250  # 235m
    assert design_cpu_m(1.1) == 100  # 55m, the floor


def test_cpu_requests_follow_the_measured_cpu_per_request() -> None:
    measured = measured_cpu_ms()
    assert set(MODULES) - {"projector"} <= set(measured), "a process lost its figure"
    for process, ms in measured.items():
        if process not in MODULES:
            continue  # Valkey: one shared store, sized in valkey.yaml
        deployment = one("Deployment", process)
        request = quantity(main_container(deployment)["resources"]["requests"]["cpu"])
        assert request * 1000 == design_cpu_m(ms), (
            f"{deployment.where}: CPU request {request * 1000}m, but {ms} ms per "
            f"recommendation x {DESIGN_RATE}/s gives {design_cpu_m(ms)}m"
        )


def test_every_container_has_requests_within_its_limits() -> None:
    for workload in workloads():
        for container in containers(workload):
            resources = container["resources"]
            for resource in ("cpu", "memory"):
                request = quantity(resources["requests"][resource])
                limit = quantity(resources["limits"][resource])
                assert 0 < request <= limit, f"{workload.where}: {container['name']} {resource}"


def test_the_collector_limit_is_above_its_memory_limiter() -> None:
    config = yaml.safe_load(one("ConfigMap", "otel-collector-config").body["data"]["config.yaml"])
    limiter_mib = config["processors"]["memory_limiter"]["limit_mib"]
    container = main_container(one("Deployment", "otel-collector"))
    assert quantity(container["resources"]["limits"]["memory"]) > limiter_mib * 2**20


def test_valkey_never_evicts_and_fits_its_limit() -> None:
    statefulset = one("StatefulSet", "valkey")
    container = main_container(statefulset)
    args = container["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--maxmemory-policy"] == "noeviction"  # the streams are the truth
    maxmemory = quantity(options["--maxmemory"].replace("gb", "Gi").replace("mb", "Mi"))
    assert maxmemory < quantity(container["resources"]["limits"]["memory"])
    assert options["--requirepass"] == "$(VALKEY_PASSWORD)"
    (password,) = [e for e in container["env"] if e["name"] == "VALKEY_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "recmesh-redis", "key": "password"}


# ---- Kubernetes: configuration, secrets, volumes -------------------------------------


def data_keys(manifest: Manifest) -> set[str]:
    body = manifest.body
    return set(body.get("data", {})) | set(body.get("stringData", {}))


def test_every_configmap_secret_and_claim_referenced_exists() -> None:
    for workload in workloads():
        volumes = pod_volumes(workload)
        for volume in volumes.values():
            if "configMap" in volume:
                one("ConfigMap", volume["configMap"]["name"])
            if "secret" in volume:
                one("Secret", volume["secret"]["secretName"])
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is not None:
                one("PersistentVolumeClaim", claim)
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{workload.where}: volume {mount['name']}"
            for variable in container.get("env", []):
                source = variable.get("valueFrom", {})
                for kind, ref in (
                    ("ConfigMap", source.get("configMapKeyRef")),
                    ("Secret", source.get("secretKeyRef")),
                ):
                    if ref is not None:
                        assert ref["key"] in data_keys(one(kind, ref["name"])), workload.where
            for env_from in container.get("envFrom", []):
                if "configMapRef" in env_from:
                    one("ConfigMap", env_from["configMapRef"]["name"])
                if "secretRef" in env_from:
                    one("Secret", env_from["secretRef"]["name"])
    for ingress in objects("Ingress"):
        for tls in ingress.body["spec"].get("tls", []):
            assert one("Secret", tls["secretName"]).body["type"] == "kubernetes.io/tls"
        for rule in ingress.body["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = one("Service", backend["name"])
                names = {p["name"] for p in service.body["spec"]["ports"]}
                assert backend["port"]["name"] in names, ingress.where
                # Only the gateway is published.
                assert selected({"matchLabels": service.body["spec"]["selector"]}) == [
                    one("Deployment", "gateway")
                ], ingress.where


def test_file_settings_point_at_keys_of_mounted_configmaps() -> None:
    for workload in workloads():
        volumes = pod_volumes(workload)
        for container in containers(workload):
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for name, value in plain_env(container).items():
                if name not in {"RECMESH_TENANTS", "RECMESH_EXPERIMENTS"}:
                    continue
                path = Path(value)
                volume = mounts.get(str(path.parent))
                assert volume is not None and "configMap" in volume, f"{workload.where}: {name}"
                configmap = one("ConfigMap", volume["configMap"]["name"])
                assert path.name in data_keys(configmap), f"{workload.where}: {name}"
            artifacts = plain_env(container).get("RECMESH_ARTIFACTS")
            if artifacts is not None:
                volume = mounts.get(artifacts)
                assert volume is not None and "persistentVolumeClaim" in volume, workload.where


def test_configmaps_are_copies_of_the_repository_files() -> None:
    config = one("ConfigMap", "recmesh-config").body["data"]
    assert json.loads(config["tenants.json"]) == json.loads(
        (ROOT / "config" / "tenants.dev.json").read_text()
    ), "recmesh-config tenants.json differs from config/tenants.dev.json"
    assert json.loads(config["experiments.json"]) == json.loads(
        (ROOT / "config" / "experiments.json").read_text()
    ), "recmesh-config experiments.json differs from config/experiments.json"
    collector = one("ConfigMap", "otel-collector-config").body["data"]["config.yaml"]
    assert yaml.safe_load(collector) == yaml.safe_load(
        (ROOT / "deploy" / "otel-collector.yaml").read_text()
    ), "otel-collector-config differs from deploy/otel-collector.yaml"


def test_secrets_hold_placeholders_only() -> None:
    for secret in objects("Secret"):
        assert "data" not in secret.body, f"{secret.where}: base64 data could hide a real value"
        for key, value in secret.body["stringData"].items():
            assert "REPLACE-ME" in value, f"{secret.where}: {key} is not a placeholder"
    redis = one("Secret", "recmesh-redis").body["stringData"]
    url = urlsplit(redis["url"])
    assert url.password == redis["password"], "the URL's password is not the server's"
    service = one("Service", str(url.hostname))
    assert url.port in {p["port"] for p in service.body["spec"]["ports"]}
    assert selected({"matchLabels": service.body["spec"]["selector"]}) == [
        one("StatefulSet", "valkey")
    ]


# ---- Kubernetes: environment against the settings classes ----------------------------


def test_the_settings_of_each_process_are_found_in_its_main() -> None:
    for process in MODULES:
        cls = settings_class_of(process)
        assert dataclasses.is_dataclass(cls), process
        assert f"RECMESH_{process.upper()}_PORT" in process_env(process)


def test_env_names_are_ones_the_settings_classes_read() -> None:
    for process in MODULES:
        deployment = one("Deployment", process)
        names = env_names(main_container(deployment))
        assert not unread(names, process_env(process)), (
            f"{deployment.where}: {sorted(unread(names, process_env(process)))} are read by "
            f"no setting of {settings_class_of(process).__name__}"
        )
    for job in objects("Job"):
        names = env_names(main_container(job))
        assert not unread(names, every_settings_env()), f"{job.where}: {sorted(names)}"
    # The check can fail: a name no setting reads is caught, an OTEL_ one the SDK reads is not.
    assert unread({"RECMESH_GATEWAY_NO_SUCH", "OTEL_SERVICE_NAME"}, process_env("gateway")) == {
        "RECMESH_GATEWAY_NO_SUCH"
    }
    assert unread({"RECMESH_FEATURE_ADDR"}, process_env("projector")) == {"RECMESH_FEATURE_ADDR"}


def test_each_process_gets_every_address_and_store_its_settings_read() -> None:
    for process in MODULES:
        deployment = one("Deployment", process)
        container = main_container(deployment)
        names = env_names(container)
        wanted_addresses = {f"RECMESH_{c.upper()}_ADDR" for c in callees(process)}
        given_addresses = {n for n in names if n.endswith("_ADDR")}
        # The defaults (127.0.0.1) are wrong in a pod: every address read must be set.
        assert given_addresses == wanted_addresses, deployment.where
        assert ("REDIS_URL" in names) == uses_redis(process), deployment.where
        for variable in ("RECMESH_TENANTS", "RECMESH_EXPERIMENTS", "RECMESH_ARTIFACTS"):
            if variable in process_env(process):
                assert variable in names, f"{deployment.where}: {variable} left at its default"
        if "OTEL_EXPORTER_OTLP_ENDPOINT" in names:
            assert plain_env(container)["OTEL_SERVICE_NAME"] == process, deployment.where
        if "REDIS_URL" in names:
            (redis,) = [e for e in container["env"] if e["name"] == "REDIS_URL"]
            ref = redis["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "recmesh-redis", "key": "url"}, deployment.where


def service_port_to(host: str, port: int) -> tuple[Manifest, int]:
    """The workload behind Service ``host``'s ``port`` and the container port it reaches."""
    service = one("Service", host)
    (entry,) = [p for p in service.body["spec"]["ports"] if p["port"] == port]
    (workload,) = selected({"matchLabels": service.body["spec"]["selector"]})
    target = entry.get("targetPort", port)
    ports = container_ports(main_container(workload))
    return workload, ports[target] if isinstance(target, str) else int(target)


def test_addresses_reach_the_process_they_name() -> None:
    for workload in workloads():
        for container in containers(workload):
            for name, value in plain_env(container).items():
                match = re.fullmatch(r"RECMESH_([A-Z]+)_ADDR", name)
                if match:
                    process = match.group(1).lower()
                    host, port = value.rsplit(":", 1)
                    reached, container_port = service_port_to(host, int(port))
                    assert app(reached) == process, f"{workload.where}: {name}={value}"
                    assert container_port == DEFAULT_PORTS[process], f"{workload.where}: {name}"
                if name == "OTEL_EXPORTER_OTLP_ENDPOINT":
                    url = urlsplit(value)
                    reached, container_port = service_port_to(str(url.hostname), int(url.port or 0))
                    assert app(reached) == "otel-collector", workload.where
                    assert container_port == 4317, workload.where


# ---- Kubernetes: network policies against the code's call graph ----------------------


ANYWHERE = "*"


def ingress_allowed() -> dict[tuple[str, int], set[str]]:
    """(workload, container port) -> the workloads (or ``ns:<name>``, or ``*``) allowed to
    connect to it, by every NetworkPolicy together."""
    allowed: dict[tuple[str, int], set[str]] = {}
    for workload in workloads():
        for container in containers(workload, init=False):
            for port in container_ports(container).values():
                allowed[(app(workload), port)] = set()
    for policy in objects("NetworkPolicy"):
        spec = policy.body["spec"]
        assert spec["policyTypes"] == ["Ingress"], policy.where
        for target in selected(spec["podSelector"]):
            ports: dict[str, int] = {}
            for container in containers(target, init=False):
                ports |= container_ports(container)
            for rule in spec.get("ingress", []):
                rule_ports = [p["port"] for p in rule.get("ports", [])] or list(ports.values())
                sources: set[str] = set()
                peers = rule.get("from", [])
                if not peers:
                    sources.add(ANYWHERE)
                for peer in peers:
                    if "namespaceSelector" in peer:
                        assert "podSelector" not in peer, policy.where
                        namespace = peer["namespaceSelector"]["matchLabels"]
                        sources.add("ns:" + namespace["kubernetes.io/metadata.name"])
                    else:
                        sources |= {app(w) for w in selected(peer["podSelector"])}
                for port in rule_ports:
                    number = ports.get(port) if isinstance(port, str) else port
                    if number is None:
                        continue  # a named port this pod does not have
                    allowed[(app(target), number)] |= sources
    return allowed


def expected_ingress() -> dict[tuple[str, int], set[str]]:
    """Who must reach what, from the code: a process reaches the services whose address
    its settings read and Valkey when they read REDIS_URL; the Jobs what their
    environment names; every process and Job the collector; the collector Jaeger;
    Prometheus in `monitoring` the services' metrics ports; anyone the gateway."""
    callers: dict[str, set[str]] = {name: set() for name in MODULES}
    callers["valkey"] = set()
    for process in MODULES:
        for callee in callees(process):
            callers[callee].add(process)
        if uses_redis(process):
            callers["valkey"].add(process)
    for job in objects("Job"):
        names = env_names(main_container(job))
        for process in MODULES:
            if f"RECMESH_{process.upper()}_ADDR" in names:
                callers[process].add(app(job))
        if "REDIS_URL" in names:
            callers["valkey"].add(app(job))
    for caller, called in CALLS_WITHOUT_SETTINGS.items():
        for callee in called:
            assert caller in callers[callee], f"{caller} -> {callee} is not in its environment"
    expected: dict[tuple[str, int], set[str]] = {}
    for process in MODULES:
        expected[(process, DEFAULT_PORTS[process])] = callers[process]
        if process in DEFAULT_METRICS_PORTS:
            expected[(process, DEFAULT_METRICS_PORTS[process])] = {"ns:monitoring"}
    expected[("gateway", DEFAULT_PORTS["gateway"])] = {ANYWHERE}
    expected[("gateway", GATEWAY_HTTP_PORT)] = {ANYWHERE}
    expected[("valkey", 6379)] = callers["valkey"]
    traced = set(MODULES) | {app(j) for j in objects("Job")}
    expected[("otel-collector", 4317)] = traced
    expected[("otel-collector", 4318)] = traced
    expected[("jaeger", 4317)] = {"otel-collector"}
    return expected


def test_network_policies_allow_exactly_the_call_graph_of_the_code() -> None:
    allowed = ingress_allowed()
    expected = expected_ingress()
    assert expected[("feature", DEFAULT_PORTS["feature"])] >= {"retrieval", "ranking"}
    assert expected[("events", DEFAULT_PORTS["events"])] >= {"gateway", "feature"}
    for key, sources in sorted(allowed.items()):
        assert sources == expected.get(key, set()), (
            f"{key[0]}:{key[1]} is open to {sorted(sources)}, the code calls it from "
            f"{sorted(expected.get(key, set()))}"
        )
    default_deny = one("NetworkPolicy", "default-deny-ingress").body["spec"]
    assert default_deny["podSelector"] == {} and "ingress" not in default_deny


def test_network_policies_select_pods_and_ports_that_exist() -> None:
    for policy in objects("NetworkPolicy"):
        spec = policy.body["spec"]
        targets = selected(spec["podSelector"])
        assert targets, f"{policy.where}: its podSelector selects no pod"
        names: set[str] = set()
        for target in targets:
            for container in containers(target, init=False):
                names |= set(container_ports(container))
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    assert selected(peer["podSelector"]), f"{policy.where}: a peer selects no pod"
            for port in rule.get("ports", []):
                if isinstance(port["port"], str):
                    assert port["port"] in names, f"{policy.where}: no pod has port {port['port']}"


# ---- Kubernetes: pod security --------------------------------------------------------


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    labels = one("Namespace", NAMESPACE).body["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads():
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext", {})
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), workload.where
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, workload.where
        assert spec.get("automountServiceAccountToken") is False, workload.where
        for container in containers(workload):
            where = f"{workload.where}: {container['name']}"
            security = container.get("securityContext", {})
            non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            assert non_root is True, where
            assert security.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, where
            seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
            assert seccomp.get("type") in {"RuntimeDefault", "Localhost"}, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert not security.get("privileged"), where
            assert "ALL" in security["capabilities"]["drop"], where
            assert set(security["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}, where
            if workload.kind != "Job":
                assert security.get("readOnlyRootFilesystem") is True, where


def test_the_gateway_outbox_is_on_a_writable_volume() -> None:
    deployment = one("Deployment", "gateway")
    container = main_container(deployment)
    outbox = Path(plain_env(container)["RECMESH_GATEWAY_OUTBOX"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts.get(str(outbox.parent))
    assert mount is not None and not mount.get("readOnly"), "the outbox must be writable"


# ---- docker-compose.yml --------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


@cache
def compose_validator() -> jsonschema.Draft202012Validator:
    raw = (HERE / "compose-spec.json").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SCHEMA_SHA256, "vendored schema changed"
    schema = json.loads(raw)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def compose_errors(document: Mapping[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in compose_validator().iter_errors(document)
    ]


def test_docker_compose_validates_against_the_compose_specification() -> None:
    assert compose_errors(compose()) == []


def test_the_compose_schema_refuses_a_misspelt_key_and_a_wrong_type() -> None:
    misspelt = copy.deepcopy(compose())
    misspelt["services"]["gateway"]["depend_on"] = ["feature"]
    assert compose_errors(misspelt)
    wrong_type = copy.deepcopy(compose())
    wrong_type["services"]["gateway"]["ports"] = "8080:8080"  # a list, not a string
    assert compose_errors(wrong_type)
    bad_condition = copy.deepcopy(compose())
    bad_condition["services"]["gateway"]["depends_on"]["feature"]["condition"] = "healthy"
    assert compose_errors(bad_condition)


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def test_compose_runs_every_process_with_its_health_check_port() -> None:
    services = compose_services()
    for process, module in MODULES.items():
        service = services[process]
        assert service["command"] == ["python", "-m", module], process
        test = service["healthcheck"]["test"]
        assert test == ["CMD", "python", "-m", "ops.healthcheck", str(DEFAULT_PORTS[process])]
    published = {str(p).rsplit(":", 1)[-1] for p in services["gateway"]["ports"]}
    assert {str(GATEWAY_HTTP_PORT), str(DEFAULT_PORTS["gateway"])} <= published


def test_compose_dependencies_exist_and_their_conditions_can_be_met() -> None:
    services = compose_services()
    for name, service in services.items():
        depends = service.get("depends_on", {})
        conditions = (
            dict.fromkeys(depends, "service_started")
            if isinstance(depends, list)
            else {k: v.get("condition", "service_started") for k, v in depends.items()}
        )
        for target, condition in conditions.items():
            assert target in services, f"{name} depends on missing {target}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name}: {target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{name}: {target} restarts"


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def recmesh_compose_services() -> Iterator[tuple[str, dict[str, Any]]]:
    """The compose services that run the RecMesh image."""
    for name, service in compose_services().items():
        if service.get("image") == "recmesh:local":
            yield name, service


def test_compose_env_names_are_read_and_addresses_reach_their_process() -> None:
    services = compose_services()
    for name, service in recmesh_compose_services():
        env = compose_env(service)
        assert not unread(set(env), every_settings_env()), f"compose {name}: {sorted(env)}"
        for variable, value in env.items():
            match = re.fullmatch(r"RECMESH_([A-Z]+)_ADDR", variable)
            if match:
                process = match.group(1).lower()
                host, port = value.rsplit(":", 1)
                assert host == process and host in services, f"compose {name}: {variable}"
                assert int(port) == DEFAULT_PORTS[process], f"compose {name}: {variable}"
        for variable in ("REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            if variable in env:
                assert urlsplit(env[variable]).hostname in services, f"compose {name}: {variable}"


def test_compose_bind_mounts_of_configuration_exist() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./deploy/"):
                assert (ROOT / source).exists(), f"compose {name}: {source} is missing"
