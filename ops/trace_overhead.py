"""What tracing costs: latency and CPU per request with sampling at 100 %, 1 % and off.

Starts one mesh per mode as processes (exactly as ``recmesh up`` does), each exporting to
its own in-memory OTLP receiver (:mod:`ops.otlp_sink`, a real OTLP/gRPC server), then
sends the same sequential ``POST /v1/recommend`` load to every mesh in interleaved blocks,
so background noise on the machine spreads evenly over the modes. Reports client-side
p50/p99 latency and the CPU time all seven mesh processes spent per request (from
``/proc/<pid>/stat``, exporter threads included)::

    python -m ops.trace_overhead                      # 3 x 3000 requests
    python -m ops.trace_overhead --requests 500 --json var/trace_overhead.json

Modes: ``off`` has no ``OTEL_EXPORTER_OTLP_ENDPOINT`` (no provider, no exporter);
``1%`` and ``100%`` use ``parentbased_traceidratio`` with that ratio and the default
batch processor settings.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mesh.paths import ARTIFACTS_DIR
from mesh.ports import DEFAULT_PORTS, free_port
from ops import supervisor
from ops.otlp_sink import OtlpSink
from ops.processes import running_pid

MODES: dict[str, str | None] = {"off": None, "1%": "0.01", "100%": "1.0"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
API_KEY = "bench-key"


def write_tenants(path: Path) -> Path:
    """One tenant whose quota the benchmark never reaches."""
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    entry = {"api_key_sha256": digest, "rate": 100000, "burst": 100000}
    path.write_text(json.dumps({"tenants": {"demo": entry}}))
    return path


@dataclass
class Run:
    """One mode's mesh, receiver and measurements."""

    mode: str
    layout: supervisor.Layout
    sink: OtlpSink | None
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    degraded: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    connection: http.client.HTTPConnection | None = None

    def pids(self) -> list[int]:
        """The live pids of the mesh's processes (one that exited counts no more CPU)."""
        found = (running_pid(self.layout.run_dir, name) for name in DEFAULT_PORTS)
        return [pid for pid in found if pid is not None]

    def cpu(self) -> float:
        """CPU seconds (user + system) the mesh's processes used so far."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLOCK_TICKS

    def request(self, user: str) -> None:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.layout.http_port, 10)
        body = json.dumps({"user_id": user, "num_items": 10})
        started = time.perf_counter()
        self.connection.request(
            "POST",
            "/v1/recommend",
            body,
            {"x-api-key": API_KEY, "Content-Type": "application/json"},
        )
        response = self.connection.getresponse()
        payload = response.read()
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            self.errors += 1
        else:
            self.degraded.update(json.loads(payload)["degraded"])


def start(mode: str, ratio: str | None, base: Path, artifacts: Path) -> Run:
    sink = OtlpSink(keep=False).start() if ratio is not None else None
    env = {"RECMESH_LOG_LEVEL": "WARNING"}
    if sink is not None:
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(ratio),
        }
    else:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    var_dir = base / mode.replace("%", "pct")
    var_dir.mkdir(parents=True)
    layout = supervisor.Layout(
        var_dir=var_dir,
        artifacts=artifacts,
        ports={name: free_port() for name in DEFAULT_PORTS},
        http_port=free_port(),
        redis_port=free_port(),
        tenants=write_tenants(var_dir / "tenants.json"),
        extra_env=env,
    )
    supervisor.up(layout, timeout_s=180)
    return Run(mode, layout, sink)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.trace_overhead", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per mode")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured requests per mode")
    parser.add_argument("--block", type=int, default=100, help="requests per interleaved block")
    parser.add_argument("--users", type=int, default=200, help="distinct user ids (u0..)")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS_DIR)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="trace-overhead-") as tmp:
        try:
            for mode, ratio in MODES.items():
                print(f"starting the mesh with tracing {mode} ...", flush=True)
                runs.append(start(mode, ratio, Path(tmp), args.artifacts))
            for run in runs:
                for n in range(args.warmup):
                    run.request(f"u{n % args.users}")
                run.latencies_ms.clear()
                run.degraded.clear()
                run.errors = 0
            sent = 0
            while sent < args.requests:
                block = min(args.block, args.requests - sent)
                for run in runs:
                    before = run.cpu()
                    for n in range(sent, sent + block):
                        run.request(f"u{n % args.users}")
                    run.cpu_s += run.cpu() - before
                sent += block
            time.sleep(6)  # the batch processor's 5 s schedule: let the last spans arrive
        finally:
            for run in runs:
                if run.connection is not None:
                    run.connection.close()
                supervisor.down(run.layout)
                if run.sink is not None:
                    run.sink.stop()

    rows = []
    for run in runs:
        spans = run.sink.span_count if run.sink is not None else 0
        rows.append(
            {
                "mode": run.mode,
                "requests": len(run.latencies_ms),
                "p50_ms": round(statistics.median(run.latencies_ms), 2),
                "p99_ms": round(percentile(run.latencies_ms, 0.99), 2),
                "cpu_ms_per_request": round(run.cpu_s * 1000 / len(run.latencies_ms), 2),
                "spans_per_request": round(spans / (len(run.latencies_ms) + args.warmup), 1),
                "degraded": dict(run.degraded),
                "errors": run.errors,
            }
        )
    base_cpu = rows[0]["cpu_ms_per_request"]
    print()
    print("| tracing | p50 ms | p99 ms | CPU ms/request (7 processes) | vs off | spans/request |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        overhead = (float(row["cpu_ms_per_request"]) / float(base_cpu) - 1) * 100
        print(
            f"| {row['mode']} | {row['p50_ms']} | {row['p99_ms']} | {row['cpu_ms_per_request']} "
            f"| {overhead:+.0f} % | {row['spans_per_request']} |"
        )
    print(f"\n{args.requests} requests per mode, sequential, interleaved blocks of {args.block}.")
    for row in rows:
        print(f"{row['mode']}: errors {row['errors']}, degraded stages {row['degraded']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
