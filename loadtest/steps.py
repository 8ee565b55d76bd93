"""``python -m loadtest.steps`` (``make bench``, ``recmesh bench``): throughput in steps of
offered load, the mesh against the monolith.

The run takes an artifact set (``--artifacts``) or trains one (``--items``, ``--users``),
and for each target (``--target mesh|monolith|both``) starts it in a directory of its own
on free ports with its own embedded Redis (:mod:`loadtest.harness`): the mesh as one
process per service plus the gateway (``ops.supervisor``), or ``python -m
loadtest.monolith``, the same funnel in one process. The tenant registry has three
tenants (``demo``, ``acme``, ``globex``, weights 6:3:1) whose keys the load uses.

Against a running target it warms up (``--warmup-s`` at the lowest rate, not recorded),
then offers each rate of ``--rates`` for ``--step-s`` seconds: one headless locust process
per step runs ``loadtest/locustfile_http.py`` (Zipf users, tenant mix, clicks after a think
time; :mod:`loadtest.traffic`) at a fixed arrival rate, ``users x per-user rate`` with
users on evenly interleaved grids, recording every request. A step's window opens when
the last user has sent its first recommendation (every user is on its grid from then on)
and lasts ``--step-s``; the process runs on until requests sent in the window have
answered or timed out. Per step it reports p50/p95/p99 latency of the recommendations sent in the
window (client-measured), errors, the achieved rate, and the CPU seconds per second of
each process of the target and of the load generator (``psutil``, by pid, over the
window).

A target sustains a rate when its step has p99 ≤ 50 ms, no error, and sent at least 95 %
of the offered rate; the run reports the highest such rate per target and their ratio.
This module runs the steps; :mod:`loadtest.step_report` computes their figures and
writes the outputs: ``docs/bench/steps.json``, ``docs/bench/steps.md`` (the tables),
``docs/bench/steps.png`` (latency against offered load) and ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# psutil (installed with locust) ships no annotations; types-psutil is not a dependency.
import psutil  # type: ignore[import-untyped]

from loadtest import step_report
from loadtest.harness import (
    QUIET_ENV,
    Target,
    add_tracing_option,
    machine,
    mesh_layout,
    prepare_artifacts,
    running_mesh,
    running_monolith,
    trace_receiver,
    write_tenants,
)
from loadtest.reporting import command_line
from loadtest.runs import add_run_options, describe_artifacts, run_directory
from loadtest.step_report import StepResult, TargetRun
from loadtest.traffic import (
    CLICK_SHARE,
    CONNECT_TIMEOUT_S,
    PER_USER_RATE,
    REQUEST_TIMEOUT_S,
    THINK_S,
    ZIPF_EXPONENT,
    TenantKey,
    write_tenant_keys,
)
from mesh.paths import PROJECT_ROOT
from ops import supervisor

LOCUSTFILE = PROJECT_ROOT / "loadtest" / "locustfile_http.py"
TENANT_WEIGHTS = {"demo": 6.0, "acme": 3.0, "globex": 1.0}
STARTERS: dict[str, Callable[[supervisor.Layout], AbstractContextManager[Target]]] = {
    "mesh": running_mesh,
    "monolith": running_monolith,
}
SPAWN_S = 1.0
"""Locust spawns every user of a step within this long (spawn rate = users per second)."""


@dataclass(frozen=True)
class Traffic:
    """The load's settings shared by every step."""

    artifacts: Path
    tenant_keys: Path
    click_share: float
    zipf: float
    seed: int


class CpuSampler:
    """Cumulative CPU seconds (user + system) of named processes, sampled every
    ``interval_s`` on a thread, as ``(wall time, {name: seconds})``."""

    def __init__(self, pids: Mapping[str, int], interval_s: float = 0.5) -> None:
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._processes = {}
        for name, pid in pids.items():
            try:
                self._processes[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        now = time.time()
        seconds = {}
        for name, process in self._processes.items():
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seconds[name] = times.user + times.system
        self.samples.append((now, seconds))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def locust_command(
    url: str, users: int, per_user_rate: float, run_s: int, traffic: Traffic, record: Path | None
) -> list[str]:
    """The headless locust command of one step (run it from the project root)."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users / SPAWN_S),
        "--run-time",
        f"{run_s}s",
        "--host",
        url,
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--artifacts",
        str(traffic.artifacts),
        "--tenant-keys",
        str(traffic.tenant_keys),
        "--per-user-rate",
        repr(per_user_rate),
        "--click-share",
        repr(traffic.click_share),
        "--zipf",
        repr(traffic.zipf),
        "--seed",
        str(traffic.seed),
    ]
    return command + (["--record", str(record)] if record is not None else [])


def pace(rate: float) -> tuple[int, float]:
    """``(users, per-user rate)`` offering exactly ``rate`` recommendations per second with
    users no faster than :data:`PER_USER_RATE`."""
    users = max(1, math.ceil(rate / PER_USER_RATE - 1e-9))
    return users, rate / users


@contextmanager
def _locust(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait()


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_step(
    target: Target, rate: float, step_s: float, traffic: Traffic, directory: Path
) -> StepResult:
    """Offer ``rate`` recommendations/s to ``target`` for a window of ``step_s`` seconds.

    The window opens when the last user sent its first recommendation (every user is on
    its grid from then on); locust runs on until every request sent in the window has
    answered or timed out.

    Raises:
        RuntimeError: the load generator failed, or did not cover the window (see its log).
    """
    users, per_user_rate = pace(rate)
    longest_s = CONNECT_TIMEOUT_S + REQUEST_TIMEOUT_S
    # Users spawn within SPAWN_S (three times that allowed for a busy machine) and send
    # their first request within one period; then the window, then its longest request.
    run_s = math.ceil(3 * SPAWN_S + 1.0 / per_user_rate + step_s + longest_s + 1.0)
    record = directory / f"step-{rate:g}.jsonl"
    command = locust_command(target.http_url, users, per_user_rate, run_s, traffic, record)
    with (
        _locust(command, directory / "locust.log") as process,
        CpuSampler({**target.pids, "locust": process.pid}) as sampler,
    ):
        code = process.wait()
    records = _read_records(record)
    if code != 0:
        raise RuntimeError(f"locust exited with {code}; see {directory / 'locust.log'}")
    try:
        window = step_report.step_window(records, users, step_s, longest_s)
    except ValueError as exc:
        raise RuntimeError(f"step {rate:g}: {exc}; see {directory / 'locust.log'}") from exc
    cpu = step_report.cpu_rates(sampler.samples, window)
    load_cpu = cpu.pop("locust", None)
    return step_report.summarise_step(rate, users, records, window, cpu, load_cpu)


def warm_up(target: Target, rate: float, seconds: float, traffic: Traffic, directory: Path) -> None:
    """Offer ``rate`` for ``seconds``, unrecorded (caches, connections, JIT-free paths)."""
    users, per_user_rate = pace(rate)
    command = locust_command(
        target.http_url, users, per_user_rate, math.ceil(seconds), traffic, None
    )
    with _locust(command, directory / "locust.log") as process:
        process.wait()


def set_up(
    directory: Path,
    artifacts: Path,
    keys: Sequence[TenantKey],
    extra_env: Mapping[str, str],
    *,
    click_share: float = CLICK_SHARE,
    zipf: float = ZIPF_EXPONENT,
    seed: int = 0,
) -> tuple[Traffic, supervisor.Layout]:
    """The traffic of a target's steps and the layout it runs in, both under ``directory``:
    a tenant registry of ``keys`` for the target, their key file for the load, and a
    layout serving ``artifacts`` with :data:`~loadtest.harness.QUIET_ENV` and
    ``extra_env`` (e.g. tracing) in its environment."""
    registry = write_tenants(directory / "tenants.json", {k.name: k.api_key for k in keys})
    traffic = Traffic(
        artifacts=artifacts,
        tenant_keys=write_tenant_keys(directory / "tenant-keys.json", keys),
        click_share=click_share,
        zipf=zipf,
        seed=seed,
    )
    return traffic, mesh_layout(directory, artifacts, registry, {**QUIET_ENV, **extra_env})


def run_target(
    name: str,
    artifacts: Path,
    base: Path,
    keys: Sequence[TenantKey],
    args: argparse.Namespace,
    tracing_env: Mapping[str, str],
) -> TargetRun:
    """Start ``name`` in ``base / name`` (``tracing_env`` added to its environment), warm
    it up, run every step of ``args.rates``, stop it."""
    directory = base / name
    directory.mkdir(parents=True)
    traffic, layout = set_up(
        directory,
        artifacts,
        keys,
        tracing_env,
        click_share=args.click_share,
        zipf=args.zipf,
        seed=args.seed,
    )
    load_before = os.getloadavg()
    print(f"[{name}] starting (load average {load_before[0]:.2f}) ...", flush=True)
    started = time.monotonic()
    steps: list[StepResult] = []
    with STARTERS[name](layout) as target:
        startup_s = time.monotonic() - started
        print(f"[{name}] SERVING after {startup_s:.1f} s; warming up", flush=True)
        if args.warmup_s > 0:
            warm_up(target, min(args.rates), args.warmup_s, traffic, directory)
        for rate in args.rates:
            step = run_step(target, rate, args.step_s, traffic, directory)
            steps.append(step)
            print(f"[{name}] {step_report.one_line(step)}", flush=True)
    return TargetRun(name, startup_s, load_before, steps)


def tenant_keys() -> list[TenantKey]:
    """The run's tenants with fresh keys (:data:`TENANT_WEIGHTS`)."""
    return [
        TenantKey(name, f"bench-{name}-{secrets.token_hex(12)}", weight)
        for name, weight in TENANT_WEIGHTS.items()
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.steps", description=__doc__)
    parser.add_argument("--target", choices=["mesh", "monolith", "both"], default="both")
    parser.add_argument(
        "--rates",
        default="25,50,100,200,400",
        help="offered recommendations/s per step (400: the overload step, 4x the target rate)",
    )
    parser.add_argument("--step-s", type=float, default=30.0, help="measured seconds per step")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="unrecorded warm-up")
    add_run_options(parser)
    parser.add_argument("--click-share", type=float, default=CLICK_SHARE, help="answers clicked")
    parser.add_argument(
        "--zipf", type=float, default=ZIPF_EXPONENT, help="Zipf exponent of users (0: uniform)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic")
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "docs" / "bench")
    parser.add_argument("--doc", type=Path, default=PROJECT_ROOT / "docs" / "benchmarks.md")
    add_tracing_option(parser)
    args = parser.parse_args(argv)
    try:
        args.rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        parser.error("--rates takes comma-separated numbers")
    if not args.rates or min(args.rates) <= 0:
        parser.error("--rates needs at least one positive rate")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the steps and write the reports; 0 when every target ran."""
    args = parse_args(argv)
    command = command_line("loadtest.steps", argv if argv is not None else sys.argv[1:])
    targets = ["mesh", "monolith"] if args.target == "both" else [args.target]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    box = machine()
    with run_directory("recmesh-steps-", args.keep) as base:
        print(f"step benchmark in {base}", flush=True)
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        described = describe_artifacts(artifacts, args.artifacts)
        keys = tenant_keys()
        with trace_receiver(args.tracing) as (tracing_env, sink):
            runs = {
                name: run_target(name, artifacts, base, keys, args, tracing_env) for name in targets
            }
    run = {
        "command": command,
        "started": started,
        "load_before": [round(value, 2) for value in load_before],
        "machine": box,
        "artifacts": described,
        "rates": args.rates,
        "step_s": args.step_s,
        "warmup_s": args.warmup_s,
        "tracing": (
            f"on: every process exports at the default head sampling (mesh.telemetry: "
            f"parent-based, ratio 0.1) to an OTLP receiver in the benchmark process, "
            f"{sink.span_count} spans received"
            if args.tracing
            else "off (--no-tracing)"
        ),
        "traffic": f"Zipf users (exponent {args.zipf:g}), tenants "
        + ", ".join(f"{name} {weight:g}" for name, weight in TENANT_WEIGHTS.items())
        + f", {100 * args.click_share:g} % of answers clicked after "
        f"{THINK_S[0]:g}-{THINK_S[1]:g} s, "
        f"{PER_USER_RATE:g} recommendations/s per user at most, 10 items each",
    }
    written = step_report.write_reports(runs, run, box, args.out_dir, args.doc)
    print(step_report.headline(runs))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
