"""What every load run needs around its load: free ports, a tenant registry, an artifact
set, a running target (the mesh as processes, or the monolith) and a description of the
machine. Used by ``loadtest.bench``, ``loadtest.steps`` and ``chaos.run``.

A target runs in a directory of its own (``var/`` below the run's base directory) on free
ports, with its own embedded Redis, so a benchmark never touches a mesh started by
``make up``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import ArtifactError
from mesh.paths import PROJECT_ROOT
from mesh.ports import DEFAULT_PORTS, SERVICES, free_port
from ops import certs, processes, supervisor
from ops.otlp_sink import OtlpSink
from training.find import find_or_train, usable_set

QUIET_ENV = {"RECMESH_LOG_LEVEL": "WARNING", "RECMESH_ARTIFACT_POLL_S": "0"}
"""Environment of benchmark targets: warnings only in the logs, no artifact polling."""


def add_tracing_option(parser: argparse.ArgumentParser) -> None:
    """``--tracing/--no-tracing`` (on by default): see :func:`trace_receiver`."""
    parser.add_argument(
        "--tracing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export traces at the default sampling to an OTLP receiver the run starts",
    )


@contextmanager
def trace_receiver(enabled: bool) -> Iterator[tuple[dict[str, str], OtlpSink]]:
    """An OTLP receiver that counts spans without keeping them, and the environment that
    makes a target export to it (empty when ``enabled`` is false: tracing off)."""
    with OtlpSink(keep=False) as sink:
        yield ({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint} if enabled else {}), sink


def write_tenants(
    path: Path, keys: Mapping[str, str], rate: float = 100_000, burst: int = 100_000
) -> Path:
    """A tenant registry (``mesh.tenants`` format) for ``keys`` (tenant -> API key in clear),
    every tenant with quota ``rate``/s and ``burst``; returns ``path``."""
    document = {
        "tenants": {
            name: {
                "api_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                "rate": rate,
                "burst": burst,
            }
            for name, key in keys.items()
        }
    }
    path.write_text(json.dumps(document))
    return path


def prepare_artifacts(explicit: Path | None, base: Path, items: int, users: int) -> Path:
    """The artifact root ``explicit``, or, when none is given, that of a small set (``users``
    users, ``items`` items; seeded, one epoch, no evaluation) trained under
    ``base / "artifacts"`` (see :func:`training.find.find_or_train`).

    Raises:
        ArtifactError: ``explicit`` holds no usable set (a benchmark asked to measure a
            given set never measures another one instead).
    """
    if explicit is not None:
        if usable_set(explicit) is None:
            raise ArtifactError(f"{explicit}: no usable artifact set (current) to benchmark")
        return explicit
    found = find_or_train(
        None,
        base / "artifacts",
        n_users=users,
        n_items=items,
        epochs=1,
        evaluate=False,
        progress=False,
    )
    return found.path.parent


def mesh_layout(
    base: Path, artifacts: Path, tenants: Path, extra_env: Mapping[str, str] | None = None
) -> supervisor.Layout:
    """A layout under ``base / "var"`` with free ports for every process and its own Redis."""
    return supervisor.Layout(
        var_dir=base / "var",
        artifacts=artifacts,
        ports={name: free_port() for name in DEFAULT_PORTS},
        http_port=free_port(),
        redis_port=free_port(),
        tenants=tenants,
        extra_env=dict(extra_env or {}),
    )


@dataclass(frozen=True)
class Target:
    """A running system under test: where to reach it and which processes it is."""

    name: str
    layout: supervisor.Layout
    pids: Mapping[str, int]
    """Process name -> pid of every process of the target (Redis included)."""

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.layout.http_port}"


def _pid(layout: supervisor.Layout, name: str) -> int:
    pid = processes.running_pid(layout.run_dir, name)
    if pid is None:
        raise RuntimeError(f"{name} is not running")
    return pid


@contextmanager
def running_mesh(layout: supervisor.Layout, timeout_s: float = 600.0) -> Iterator[Target]:
    """Redis, every service and the gateway as processes (``ops.supervisor``; each must be
    SERVING within ``timeout_s``), stopped on exit."""
    try:
        supervisor.up(layout, timeout_s=timeout_s)
        names = ["redis", *SERVICES, "gateway"]
        yield Target("mesh", layout, {name: _pid(layout, name) for name in names})
    finally:
        supervisor.down(layout)


@contextmanager
def running_monolith(layout: supervisor.Layout, timeout_s: float = 1800.0) -> Iterator[Target]:
    """Redis and ``python -m loadtest.monolith`` (one process with the whole funnel), stopped
    on exit.

    The monolith gets the environment the mesh processes get (``layout.env()``) and is
    ready when the gateway's gRPC port reports SERVING, which it does after materialising
    every tenant's features (minutes for a million items: hence the long default).

    Raises:
        RuntimeError: the monolith exited or was not SERVING within ``timeout_s``.
    """
    from ops.redis_server import start_embedded_redis

    if layout.tls:  # the monolith's gRPC port is mTLS too, as `recmesh up` makes the mesh's
        certs.ensure(layout.certs_dir)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    redis = start_embedded_redis(
        layout.var_dir / "redis", layout.redis_port, layout.log_dir / "redis.log"
    )
    processes.record(layout.run_dir, processes.REDIS, redis.pid)
    log_path = layout.log_dir / "monolith.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "loadtest.monolith"],
                cwd=PROJECT_ROOT,
                env=layout.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        transport = layout.transport()
        while supervisor.health_status(layout.ports["gateway"], transport) != "SERVING":
            if process.poll() is not None:
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"the monolith exited during start-up; its log ends:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the monolith was not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)
        yield Target("monolith", layout, {"redis": redis.pid, "monolith": process.pid})
    finally:
        if process is not None:
            stop_process(process)
        supervisor.down(layout)


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM ``process``, and SIGKILL it when it has not exited after ``grace_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def machine() -> dict[str, str]:
    """What the figures were measured on: CPU, memory, OS, Python, libraries, commit."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    import grpc
    import numpy as np
    import onnxruntime

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "libraries": f"grpcio {grpc.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {np.__version__}",
        "commit": (commit or "unknown") + (" with uncommitted changes" if dirty else ""),
    }
