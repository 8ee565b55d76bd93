"""``recmesh up|down|status``: run the whole mesh as local processes.

Every process ``up`` starts (the embedded Redis, six services, the gateway) gets a pid
file under ``<var>/run`` (:mod:`ops.processes` finds and signals them by name) and a log
under ``<var>/log``; ``down`` stops exactly those processes (SIGTERM, then SIGKILL after a
grace period) and nothing else. Before starting anything ``up`` makes sure the mesh's CA
and every identity's certificate are in ``<var>/tls`` (:mod:`ops.certs`), unless TLS is
off; the supervisor's own calls (health, materialisation) present the ``ops`` identity.
"""

from __future__ import annotations

import os
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
from mesh.errors import ConfigError
from mesh.paths import ARTIFACTS_DIR, VAR_DIR
from mesh.ports import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY_HTTP_PORT, SERVICES
from mesh.settings import load
from mesh.tenants import load_tenants
from mesh.tls import Transport
from ops import certs, processes
from ops.processes import MODULES, REDIS
from ops.redis_server import start_embedded_redis, wait_for_redis
from ops.settings import OpsSettings

REDIS_PORT = 6390


@dataclass(frozen=True)
class Layout:
    """Where one mesh lives: ports, state directory, artifacts, Redis.

    ``redis_url`` empty means start the embedded server on ``redis_port``. A service
    missing from ``metrics_ports`` serves ``/metrics`` on a free port. ``tls`` off makes
    every process plaintext (local debugging only); ``tls_dir`` None means ``<var>/tls``.
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
    tls: bool = True
    tls_dir: Path | None = None
    tls_identity: str = "ops"

    @classmethod
    def from_settings(cls, settings: OpsSettings) -> Layout:
        """The default mesh's layout (under ``var/``) on the ports and Redis of ``settings``."""
        return cls(
            ports=settings.ports(),
            metrics_ports=settings.metrics_ports(),
            http_port=settings.http_port,
            redis_url=settings.redis_url,
            artifacts=settings.artifacts,
            tenants=settings.tenants,
            tls=settings.tls,
            tls_dir=settings.tls_dir,
            tls_identity=settings.tls_identity,
        )

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def certs_dir(self) -> Path:
        """The CA and identity certificates of this mesh's processes."""
        return self.tls_dir if self.tls_dir is not None else self.var_dir / "tls"

    def transport(self) -> Transport:
        """How the tools reach this mesh: mTLS as ``tls_identity`` (``ops``), or plaintext.

        Raises:
            ConfigError: TLS is on and the certificates are not issued yet.
        """
        return Transport.load(self.tls, self.certs_dir, self.tls_identity)

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
        environment["RECMESH_TLS"] = "on" if self.tls else "off"
        environment["RECMESH_TLS_DIR"] = str(self.certs_dir)
        if self.tenants is not None:
            environment["RECMESH_TENANTS"] = str(self.tenants)
        for name, port in self.ports.items():
            environment[f"RECMESH_{name.upper()}_PORT"] = str(port)
            environment[f"RECMESH_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        for name in DEFAULT_METRICS_PORTS:
            port = self.metrics_ports.get(name, 0)
            environment[f"RECMESH_{name.upper()}_METRICS_PORT"] = str(port)
        return environment


def _spawn(layout: Layout, name: str) -> subprocess.Popen[bytes]:
    """Start mesh process ``name`` (``python -m <module>``) and record its pid."""
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.log_dir / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", MODULES[name]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=layout.env(),
            start_new_session=True,
        )
    processes.record(layout.run_dir, name, process.pid)
    return process


def _start_redis(layout: Layout) -> None:
    """Start the embedded Redis on ``layout.redis_port`` and record its pid."""
    process = start_embedded_redis(
        layout.var_dir / "redis", layout.redis_port, layout.log_dir / "redis.log"
    )
    processes.record(layout.run_dir, REDIS, process.pid)


def health_status(port: int, transport: Transport, timeout_s: float = 0.5) -> str:
    """``grpc.health.v1`` status of the server on ``port`` ("UNREACHABLE" when none, or
    when it refused ``transport``: a plaintext call to a TLS port, or the other way)."""
    with transport.sync_channel(f"127.0.0.1:{port}") as channel:
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
    transport = layout.transport()
    while pending and time.monotonic() < deadline:
        for name in list(pending):
            if name in started and started[name].poll() is not None:
                tail = (layout.log_dir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited during start-up; its log ends:\n{tail}")
            if health_status(layout.ports[name], transport) == "SERVING":
                pending.remove(name)
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"not SERVING after {timeout_s:.0f} s: {', '.join(pending)}")


def materialize(layout: Layout, tenants: list[str]) -> None:
    """Ask the feature service to load the current artifact set for each tenant."""
    address = f"127.0.0.1:{layout.ports['feature']}"
    with layout.transport().sync_channel(address, server="feature") as channel:
        stub = feature_pb2_grpc.FeatureServiceStub(channel)
        for tenant in tenants:
            reply = stub.Materialize(
                feature_pb2.MaterializeRequest(), metadata=((TENANT_KEY, tenant),), timeout=600
            )
            state = "loaded" if reply.loaded else "already current"
            print(f"  features for {tenant}: {reply.users} users, {reply.items} items ({state})")


def up(layout: Layout, timeout_s: float = 120.0) -> None:
    """Start Redis (unless external), every service, materialise features, then the gateway.

    Processes already running from an earlier ``up`` are kept. With TLS on, the
    certificates are issued first where missing or expiring (:func:`ops.certs.ensure`).

    Raises:
        RuntimeError: a process exited or did not become SERVING in time.
    """
    if layout.tls:
        certs.ensure(layout.certs_dir)
    if not layout.redis_url and processes.running_pid(layout.run_dir, REDIS) is None:
        _start_redis(layout)
    wait_for_redis(layout.effective_redis_url())
    started = {
        name: _spawn(layout, name)
        for name in SERVICES
        if processes.running_pid(layout.run_dir, name) is None
    }
    _wait_serving(layout, list(SERVICES), started, timeout_s)
    registry_path = load(OpsSettings, layout.env()).tenants
    materialize(layout, list(load_tenants(registry_path).tenants))
    if processes.running_pid(layout.run_dir, "gateway") is None:
        started["gateway"] = _spawn(layout, "gateway")
    _wait_serving(layout, ["gateway"], started, timeout_s)


def restart(layout: Layout, name: str, timeout_s: float = 60.0) -> None:
    """Start ``name`` (a service, the gateway or the embedded Redis) again after it exited.

    Chaos runs kill one process and call this to bring it back; it waits until the
    process is SERVING (Redis: answers PING).

    Raises:
        RuntimeError: ``name`` is still running, exited during start-up or did not
            become SERVING in time.
    """
    if processes.running_pid(layout.run_dir, name) is not None:
        raise RuntimeError(f"{name} is still running; not starting a second one")
    if name == REDIS:
        _start_redis(layout)
        return
    started = {name: _spawn(layout, name)}
    _wait_serving(layout, [name], started, timeout_s)


def down(layout: Layout, grace_s: float = 10.0) -> list[str]:
    """Stop every process ``up`` started (gateway first, Redis last); return their names."""
    names = ["gateway", *reversed(SERVICES), REDIS]
    return [name for name in names if processes.stop(layout.run_dir, name, grace_s)]


def status(layout: Layout) -> list[tuple[str, str, str]]:
    """``(name, pid or "-", health)`` of every process of the mesh."""
    rows = []
    redis_pid = processes.running_pid(layout.run_dir, REDIS)
    redis_state = "external" if layout.redis_url else ("running" if redis_pid else "stopped")
    rows.append(("redis", str(redis_pid or "-"), redis_state))
    try:
        transport: Transport | None = layout.transport()
    except ConfigError:  # TLS on and nothing issued yet: nothing of this mesh can run
        transport = None
    for name in [*SERVICES, "gateway"]:
        pid = processes.running_pid(layout.run_dir, name)
        health = (
            "NO-CERTIFICATES" if transport is None else health_status(layout.ports[name], transport)
        )
        rows.append((name, str(pid or "-"), health))
    return rows
