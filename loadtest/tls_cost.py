"""``python -m loadtest.tls_cost``: what mutual TLS costs per call and per connection.

Starts the experiment service as two processes (``python -m services.experiment``, no
Redis needed), one plaintext (``RECMESH_TLS=off``) and one with mTLS (certificates issued
into a temporary directory by :mod:`ops.certs`), and from this process, over one reused
channel to each (the mesh's channels live as long as their processes), times:

* ``health``: ``--calls`` sequential ``grpc.health.v1`` checks (no tenant, so the server's
  identity rule is skipped);
* ``assign``: ``--calls`` sequential ``ExperimentService.Assign`` calls naming a tenant, as
  the gateway (mTLS: the caller's identity is read from the connection and checked);
* ``connect``: ``--connections`` new channels, each opened, used for one health check and
  closed: the handshake's cost.

For each it prints the CPU time per operation of the client (this process,
``process_time``) and of the server (``/proc/<pid>/stat``), and the wall time, plaintext
against mTLS: the median of ``--rounds`` rounds, each measuring both back to back, so that
a busy machine's noise falls on both. An idle machine still gives the steadier figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from mesh.client import open_channel
from mesh.context import TENANT_KEY
from mesh.paths import PROJECT_ROOT
from mesh.ports import free_port
from mesh.tls import Transport
from ops import certs
from ops.supervisor import health_status

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(frozen=True)
class Cost:
    """Per-operation means: client CPU, server CPU and wall time, in microseconds."""

    client_us: float
    server_us: float
    wall_us: float


@contextmanager
def experiment_process(tls: bool, tls_dir: Path) -> Iterator[tuple[int, int]]:
    """The experiment service as a process, SERVING: yields (pid, port)."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "RECMESH_EXPERIMENT_PORT": str(port),
            "RECMESH_EXPERIMENT_METRICS_PORT": "0",
            "RECMESH_TLS": "on" if tls else "off",
            "RECMESH_TLS_DIR": str(tls_dir),
            "RECMESH_LOG_LEVEL": "WARNING",
            "OTEL_SDK_DISABLED": "true",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.experiment"],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        probe = Transport.load(tls, tls_dir, "ops")
        deadline = time.monotonic() + 60
        while health_status(port, probe) != "SERVING":
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the experiment service did not start")
            time.sleep(0.1)
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(timeout=30)


async def measure(pid: int, n: int, one: Callable[[], Awaitable[object]]) -> Cost:
    """Run ``one()`` ``n`` times in sequence; the mean cost of one."""
    client, server, wall = time.process_time(), process_cpu_s(pid), time.perf_counter()
    for _ in range(n):
        await one()
    return Cost(
        (time.process_time() - client) / n * 1e6,
        (process_cpu_s(pid) - server) / n * 1e6,
        (time.perf_counter() - wall) / n * 1e6,
    )


async def run_rounds(
    tls_dir: Path, calls: int, connections: int, rounds: int
) -> dict[bool, dict[str, Cost]]:
    """Both servers up at once; ``rounds`` times, each operation measured plaintext then
    mTLS, back to back (a busy machine's noise falls on both); the median per mode."""
    address_of = "127.0.0.1:{}".format
    request = health_pb2.HealthCheckRequest()
    assign = experiment_pb2.AssignRequest(user_id="u1")
    metadata = ((TENANT_KEY, "demo"),)
    samples: dict[bool, dict[str, list[Cost]]] = {mode: {} for mode in (False, True)}
    with experiment_process(False, tls_dir) as plain, experiment_process(True, tls_dir) as mtls:
        servers = {False: plain, True: mtls}
        transports = {mode: Transport.load(mode, tls_dir, "gateway") for mode in servers}
        channels = {
            mode: open_channel(address_of(port), transports[mode], server="experiment")
            for mode, (_, port) in servers.items()
        }
        try:
            operations: dict[bool, dict[str, Callable[[], Awaitable[object]]]] = {}
            for mode, channel in channels.items():
                health = health_pb2_grpc.HealthStub(channel)
                experiment = experiment_pb2_grpc.ExperimentServiceStub(channel)
                port = servers[mode][1]
                transport = transports[mode]

                async def check(health: Any = health) -> object:
                    return await health.Check(request, timeout=5)

                async def assigned(experiment: Any = experiment) -> object:
                    return await experiment.Assign(assign, metadata=metadata, timeout=5)

                async def connect(port: int = port, transport: Transport = transport) -> object:
                    address = address_of(port)
                    async with open_channel(address, transport, server="experiment") as fresh:
                        return await health_pb2_grpc.HealthStub(fresh).Check(request, timeout=5)

                operations[mode] = {"health": check, "assign": assigned, "connect": connect}
                for _ in range(200):  # warm-up: connection, caches, the server's code paths
                    await check()
                    await assigned()
            for _ in range(rounds):
                for name, count in (("health", calls), ("assign", calls), ("connect", connections)):
                    for mode in (False, True):
                        pid = servers[mode][0]
                        cost = await measure(pid, count, operations[mode][name])
                        samples[mode].setdefault(name, []).append(cost)
        finally:
            for channel in channels.values():
                await channel.close()
    return {
        mode: {name: median_cost(costs) for name, costs in by_name.items()}
        for mode, by_name in samples.items()
    }


def median_cost(costs: list[Cost]) -> Cost:
    """The median of each field over ``costs``."""
    return Cost(
        statistics.median(c.client_us for c in costs),
        statistics.median(c.server_us for c in costs),
        statistics.median(c.wall_us for c in costs),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.tls_cost", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        tls_dir = Path(directory)
        certs.ensure(tls_dir, ["experiment", "gateway", "ops"])
        medians = asyncio.run(run_rounds(tls_dir, args.calls, args.connections, args.rounds))
    plain, mtls = medians[False], medians[True]
    print(
        f"{args.calls} calls per row over one channel; connect: {args.connections} new "
        f"channels, one health check each. Microseconds per operation, the median of "
        f"{args.rounds} rounds (plaintext and mTLS measured back to back in each)."
    )
    print()
    print(
        "| operation | client CPU plain | client CPU mTLS | server CPU plain | server CPU mTLS "
        "| wall plain | wall mTLS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("health", "assign", "connect"):
        p, m = plain[name], mtls[name]
        print(
            f"| {name} | {p.client_us:.0f} | {m.client_us:.0f} | {p.server_us:.0f} | "
            f"{m.server_us:.0f} | {p.wall_us:.0f} | {m.wall_us:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
