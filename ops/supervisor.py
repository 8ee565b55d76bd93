"""``recmesh up|down|status``: run the whole mesh as local processes.

Every process ``up`` starts (the embedded Redis, six services, the gateway) gets a pid
file under ``<var>/run`` and a log under ``<var>/log``; ``down`` stops exactly those
processes (SIGTERM, then SIGKILL after a grace period) and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.feature.v1 import feature_pb2, feature_pb2_grpc

from mesh.context import TENANT_KEY
from mesh.paths import ARTIFACTS_DIR, VAR_DIR
from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY_HTTP_PORT, SERVICES
from mesh.settings import load, tenants_file
from mesh.tenants import load_tenants
from ops.redis_server import start_embedded_redis, wait_for_redis

MODULES: dict[str, str] = {name: f"services.{name}" for name in SERVICES} | {"gateway": "gateway"}
REDIS_PORT = 6390


@dataclass(frozen=True)
class Layout:
    """Where one mesh lives: ports, state directory, artifacts, Redis.

    ``redis_url`` empty means start the embedded server on ``redis_port``. A service
    missing from ``metrics_ports`` serves ``/metrics`` on a free port.
    """

    var_dir: Path = VAR_DIR
    artifacts: Path = ARTIFACTS_DIR
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    http_port: int = GATEWAY_HTTP_PORT
    redis_url: str = ""
    redis_port: int = REDIS_PORT
    tenants: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    metrics_ports: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Layout:
        """The default layout, honouring ``REDIS_URL`` and the ``RECMESH_*_PORT`` variables."""
        ports = {
            name: int(os.environ.get(f"RECMESH_{name.upper()}_PORT", port))
            for name, port in DEFAULT_PORTS.items()
        }
        metrics_ports = {
            name: int(os.environ.get(f"RECMESH_{name.upper()}_METRICS_PORT", port))
            for name, port in DEFAULT_METRICS_PORTS.items()
        }
        return cls(
            ports=ports,
            metrics_ports=metrics_ports,
            http_port=int(os.environ.get("RECMESH_GATEWAY_HTTP_PORT", GATEWAY_HTTP_PORT)),
            redis_url=os.environ.get("REDIS_URL", ""),
            artifacts=Path(os.environ.get("RECMESH_ARTIFACTS", ARTIFACTS_DIR)),
        )

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def faults_file(self) -> Path:
        """The fault flags file every process of this mesh watches."""
        return self.var_dir / "faults.json"

    def effective_redis_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        """Environment every child process gets."""
        environment = dict(os.environ)
        environment.update(self.extra_env)
        environment["REDIS_URL"] = self.effective_redis_url()
        environment["RECMESH_ARTIFACTS"] = str(self.artifacts)
        environment["RECMESH_GATEWAY_HTTP_PORT"] = str(self.http_port)
        environment["RECMESH_GATEWAY_OUTBOX"] = str(self.var_dir / "outbox.db")
        environment["RECMESH_FAULTS_FILE"] = str(self.faults_file)
        if self.tenants is not None:
            environment["RECMESH_TENANTS"] = str(self.tenants)
        for name, port in self.ports.items():
            environment[f"RECMESH_{name.upper()}_PORT"] = str(port)
            environment[f"RECMESH_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        for name in DEFAULT_METRICS_PORTS:
            port = self.metrics_ports.get(name, 0)
            environment[f"RECMESH_{name.upper()}_METRICS_PORT"] = str(port)
        return environment


def _pid_file(layout: Layout, name: str) -> Path:
    return layout.run_dir / f"{name}.pid"


def _running_pid(layout: Layout, name: str) -> int | None:
    """The pid recorded for ``name`` if that process is alive and is still ours."""
    path = _pid_file(layout, name)
    try:
        pid = int(path.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    marker = "valkey-server" if name == "redis" else MODULES[name]
    return pid if marker in cmdline else None


def _spawn(layout: Layout, name: str, command: list[str]) -> subprocess.Popen[bytes]:
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.log_dir / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=layout.env(),
            start_new_session=True,
        )
    _pid_file(layout, name).write_text(str(process.pid))
    return process


def health_status(port: int, timeout_s: float = 0.5) -> str:
    """``grpc.health.v1`` status of the server on ``port`` ("UNREACHABLE" when none)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _wait_serving(
    layout: Layout,
    names: list[str],
    started: Mapping[str, subprocess.Popen[bytes]],
    timeout_s: float,
) -> None:
    """Wait until each of ``names`` is SERVING; fail early when one ``up`` started exits."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if name in started and started[name].poll() is not None:
                tail = (layout.log_dir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited during start-up; its log ends:\n{tail}")
            if health_status(layout.ports[name]) == "SERVING":
                pending.remove(name)
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"not SERVING after {timeout_s:.0f} s: {', '.join(pending)}")


def materialize(layout: Layout, tenants: list[str]) -> None:
    """Ask the feature service to load the current artifact set for each tenant."""
    with grpc.insecure_channel(f"127.0.0.1:{layout.ports['feature']}") as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        for tenant in tenants:
            reply = stub.Materialize(
                feature_pb2.MaterializeRequest(), metadata=((TENANT_KEY, tenant),), timeout=600
            )
            state = "loaded" if reply.loaded else "already current"
            print(f"  features for {tenant}: {reply.users} users, {reply.items} items ({state})")


def up(layout: Layout, timeout_s: float = 120.0) -> None:
    """Start Redis (unless external), every service, materialise features, then the gateway.

    Processes already running from an earlier ``up`` are kept.

    Raises:
        RuntimeError: a process exited or did not become SERVING in time.
    """
    if not layout.redis_url and _running_pid(layout, "redis") is None:
        process = start_embedded_redis(
            layout.var_dir / "redis", layout.redis_port, layout.log_dir / "redis.log"
        )
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        _pid_file(layout, "redis").write_text(str(process.pid))
    wait_for_redis(layout.effective_redis_url())
    started = {
        name: _spawn(layout, name, [sys.executable, "-m", MODULES[name]])
        for name in SERVICES
        if _running_pid(layout, name) is None
    }
    _wait_serving(layout, list(SERVICES), started, timeout_s)
    registry_path = layout.tenants or load(_TenantsOnly).tenants
    materialize(layout, list(load_tenants(registry_path).tenants))
    if _running_pid(layout, "gateway") is None:
        started["gateway"] = _spawn(layout, "gateway", [sys.executable, "-m", "gateway"])
    _wait_serving(layout, ["gateway"], started, timeout_s)


def restart(layout: Layout, name: str, timeout_s: float = 60.0) -> None:
    """Start ``name`` (a service, the gateway or the embedded Redis) again after it exited.

    Chaos runs kill one process and call this to bring it back; it waits until the
    process is SERVING (Redis: answers PING).

    Raises:
        RuntimeError: ``name`` is still running, exited during start-up or did not
            become SERVING in time.
    """
    if _running_pid(layout, name) is not None:
        raise RuntimeError(f"{name} is still running; not starting a second one")
    if name == "redis":
        process = start_embedded_redis(
            layout.var_dir / "redis", layout.redis_port, layout.log_dir / "redis.log"
        )
        _pid_file(layout, "redis").write_text(str(process.pid))
        return
    started = {name: _spawn(layout, name, [sys.executable, "-m", MODULES[name]])}
    _wait_serving(layout, [name], started, timeout_s)


def down(layout: Layout, grace_s: float = 10.0) -> list[str]:
    """Stop every process ``up`` started (gateway first, Redis last); return their names."""
    stopped = []
    for name in ["gateway", *reversed(SERVICES), "redis"]:
        pid = _running_pid(layout, name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _running_pid(layout, name) is not None:
                time.sleep(0.05)
            if _running_pid(layout, name) is not None:
                os.kill(pid, signal.SIGKILL)
            stopped.append(name)
        _pid_file(layout, name).unlink(missing_ok=True)
    return stopped


def status(layout: Layout) -> list[tuple[str, str, str]]:
    """``(name, pid or "-", health)`` of every process of the mesh."""
    rows = []
    redis_pid = _running_pid(layout, "redis")
    redis_state = "external" if layout.redis_url else ("running" if redis_pid else "stopped")
    rows.append(("redis", str(redis_pid or "-"), redis_state))
    for name in [*SERVICES, "gateway"]:
        pid = _running_pid(layout, name)
        rows.append((name, str(pid or "-"), health_status(layout.ports[name])))
    return rows


@dataclass(frozen=True)
class _TenantsOnly:
    tenants: Path = tenants_file()
