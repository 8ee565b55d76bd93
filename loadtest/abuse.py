"""A noisy tenant: what a tenant bursting far over its quota costs another tenant.

Starts the mesh as processes (its own Redis, free ports; ``loadtest.harness``) with two
tenants in a temporary tenant file: ``steady`` (tenant A, a quota it never reaches) and
``noisy`` (tenant B, ``--quota-b`` requests/s, burst the same). Then, open loop (each
request sent on its own schedule, whatever the answers do) against the HTTP API:

1. **alone**: A at ``--rate-a`` recommendations/s for ``--seconds``;
2. **beside B at its quota**: A as before, and B sending its quota (the control: what B's
   served requests cost A);
3. **beside B at 20x**: A as before, and B at ``--factor`` times its quota.

The three phases run in turn, ``--rounds`` times, so a change in the machine's other load
falls on each; a phase's figures are over all its rounds (six rounds of 20 s at 30/s: a
phase's p99 rests on its 36 slowest of 3,600 answers).
It reports A's latency (p50, p99, as the client saw it) in each phase and the ratios,
B's answers (the refused share), the gateway's time to refuse one of B's requests
(``recmesh_gateway_refusal_seconds{status="429"}``, from its route's middleware to the
answer, p50/p99 interpolated in the histogram's buckets, and the client's view of the same
requests), each process's CPU in each phase and what the quota service's usage says of
each tenant (``GetUsage``). The load generator runs on the same machine as the mesh and its
CPU is in the table too.

Writes ``--out`` (Markdown) with the command line; the targets (issue 17): B refused within
~1 ms per request, A's p99 raised by at most 20 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from recmesh.quota.v1 import quota_pb2, quota_pb2_grpc

from loadtest.harness import (
    QUIET_ENV,
    Target,
    machine,
    mesh_layout,
    prepare_artifacts,
    running_mesh,
    write_tenants,
)
from loadtest.reporting import command_line, ms, percentile, run_section, table
from loadtest.runs import describe_artifacts, run_directory
from loadtest.steps import CpuSampler
from loadtest.traffic import n_users_of
from mesh.paths import PROJECT_ROOT
from training.find import usable_set

STEADY, NOISY = "steady", "noisy"
ALONE, AT_QUOTA, BURST = "alone", "beside B at its quota", "beside B at 20x"
PHASES = (ALONE, AT_QUOTA, BURST)
"""A alone; beside B sending exactly its quota (the control: B's own served requests);
beside B bursting (the control plus the refusals)."""
KEYS = {STEADY: "steady-key", NOISY: "noisy-key"}
REFUSAL_METRIC = "recmesh_gateway_refusal_seconds"


@dataclass
class Shot:
    """One request: its tenant, phase, status (0: no answer) and client-side latency."""

    tenant: str
    phase: str
    status: int
    latency_s: float


@dataclass
class Phase:
    """What one phase measured."""

    name: str
    seconds: float
    shots: list[Shot] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    refusal_buckets: list[tuple[float, float]] = field(default_factory=list)
    """(upper bound, requests) of the gateway's 429 refusal histogram during the phase."""


async def fire(
    session: aiohttp.ClientSession,
    url: str,
    tenant: str,
    user: str,
    phase: str,
    shots: list[Shot],
) -> None:
    started = time.perf_counter()
    status = 0
    try:
        async with session.post(
            url, json={"user_id": user, "num_items": 10}, headers={"x-api-key": KEYS[tenant]}
        ) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    shots.append(Shot(tenant, phase, status, time.perf_counter() - started))


async def drive(
    session: aiohttp.ClientSession,
    url: str,
    tenant: str,
    rate: float,
    seconds: float,
    users: Sequence[str],
    phase: str,
    shots: list[Shot],
    seed: int,
) -> None:
    """Send ``rate`` requests/s of ``tenant`` for ``seconds``, each on its own schedule
    (``k / rate`` after the start), and wait for their answers."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for k in range(round(rate * seconds)):
        delay = start + k / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        user = users[rng.randrange(len(users))]
        tasks.append(asyncio.create_task(fire(session, url, tenant, user, phase, shots)))
    await asyncio.gather(*tasks)


async def refusal_buckets(session: aiohttp.ClientSession, metrics_url: str) -> dict[float, float]:
    """The gateway's cumulative 429 refusal histogram: upper bound -> requests."""
    async with session.get(metrics_url) as response:
        text = await response.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != REFUSAL_METRIC:
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == REFUSAL_METRIC + "_bucket"
                and labels.get("api") == "http"
                and labels.get("status") == "429"
            ):
                buckets[float(labels["le"])] = sample.value
    return buckets


def quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a cumulative histogram ``(upper bound, count)``, linear
    within its bucket (as Prometheus's ``histogram_quantile``); None when empty."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def cpu_between(sampler: CpuSampler, since: float, until: float) -> dict[str, float]:
    """CPU seconds each sampled process spent between two wall times (nearest samples)."""
    first = min(sampler.samples, key=lambda s: abs(s[0] - since))[1]
    last = min(sampler.samples, key=lambda s: abs(s[0] - until))[1]
    return {name: last[name] - first.get(name, 0.0) for name in last}


async def usage_of(target: Target) -> dict[str, quota_pb2.TenantUsage]:
    layout = target.layout
    channel = layout.transport().channel(f"127.0.0.1:{layout.ports['quota']}", server="quota")
    async with channel:
        reply = await quota_pb2_grpc.QuotaServiceStub(channel).GetUsage(
            quota_pb2.GetUsageRequest(), timeout=5
        )
    return {row.tenant: row for row in reply.usage}


async def measure(
    target: Target, args: argparse.Namespace, users: Sequence[str], user_format: str
) -> tuple[list[Phase], dict[str, quota_pb2.TenantUsage]]:
    """Warm up, then ``args.rounds`` rounds of the three phases, in turn (so a change in
    the machine's other load falls on each); each phase's figures summed over its rounds.
    B is driven by a process of its own, so its requests never delay A's in the client."""
    url = target.http_url + "/v1/recommend"
    metrics_url = target.http_url + "/metrics"
    timeout = aiohttp.ClientTimeout(total=5.0)
    async with (
        aiohttp.ClientSession(timeout=timeout) as steady,
        aiohttp.ClientSession(timeout=timeout) as scrape,
    ):
        warm: list[Shot] = []
        await drive(steady, url, STEADY, args.rate_a, args.warm_up, users, "warm-up", warm, 1)
        await asyncio.sleep(2.0)  # the gateway's last costs flushed
        usage_before = await usage_of(target)
        phases = {name: Phase(name, 0.0) for name in PHASES}
        refusals: dict[float, float] = {}
        pids = {**target.pids, "load generator (A)": os.getpid()}
        with CpuSampler(pids, interval_s=0.5) as sampler:
            for round_ in range(args.rounds):
                for name in PHASES:
                    phase = phases[name]
                    before = await refusal_buckets(scrape, metrics_url)
                    noisy = None
                    start_at = time.time() + 0.2
                    if name != ALONE:
                        start_at = time.time() + 5.0  # the driver's start-up
                        rate_b = args.quota_b * (args.factor if name == BURST else 1.0)
                        noisy = start_noisy(url, args, rate_b, len(users), user_format, start_at)
                    await asyncio.sleep(max(0.0, start_at - time.time()))
                    since = time.time()
                    await drive(
                        steady, url, STEADY, args.rate_a, args.seconds, users, name,
                        phase.shots, 10 + round_,
                    )  # fmt: skip
                    until = time.time()
                    if noisy is not None:
                        shots, cpu_s = await asyncio.to_thread(finish_noisy, *noisy, name)
                        phase.shots += shots
                        phase.cpu_s["load generator (B)"] = (
                            phase.cpu_s.get("load generator (B)", 0.0) + cpu_s
                        )
                    await asyncio.sleep(1.0)  # the CPU sampler's next sample
                    after = await refusal_buckets(scrape, metrics_url)
                    for process, cpu in cpu_between(sampler, since, until).items():
                        phase.cpu_s[process] = phase.cpu_s.get(process, 0.0) + cpu
                    if name == BURST:
                        for bound, count in after.items():
                            refusals[bound] = (
                                refusals.get(bound, 0.0) + count - before.get(bound, 0.0)
                            )
                    phase.seconds += args.seconds
                    await asyncio.sleep(1.0)
        phases[BURST].refusal_buckets = sorted(refusals.items())
    await asyncio.sleep(2.0)  # the gateway's last costs flushed
    return [phases[name] for name in PHASES], usage_before


def start_noisy(
    url: str,
    args: argparse.Namespace,
    rate: float,
    n_users: int,
    user_format: str,
    start_at: float,
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start B's driver (``--drive-noisy``) in a process of its own; it sends ``rate``
    requests/s from ``start_at`` (wall time) for ``args.seconds`` and writes its shots to a
    file."""
    out = Path(tempfile.mkstemp(prefix="abuse-noisy-", suffix=".json")[1])
    command = [
        sys.executable, "-m", "loadtest.abuse", "--drive-noisy", url,
        "--rate", str(rate), "--seconds", str(args.seconds),
        "--start-at", str(start_at), "--users", str(n_users), "--user-format", user_format,
        "--shots", str(out),
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=PROJECT_ROOT), out


def finish_noisy(
    process: subprocess.Popen[bytes], out: Path, phase: str
) -> tuple[list[Shot], float]:
    """B's shots in ``phase`` and the CPU seconds its driver spent, once it exited."""
    if process.wait(timeout=600) != 0:
        raise RuntimeError("the noisy tenant's driver failed")
    document = json.loads(out.read_text())
    out.unlink()
    shots = [Shot(NOISY, phase, status, latency) for status, latency in document["shots"]]
    return shots, float(document["cpu_s"])


async def drive_noisy(args: argparse.Namespace) -> None:
    """B's side of a burst phase (run by :func:`start_noisy`)."""
    users = [args.user_format.format(row=row) for row in range(args.users)]
    shots: list[Shot] = []
    timeout = aiohttp.ClientTimeout(total=5.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        cpu_before = time.process_time()
        await drive(
            session, args.drive_noisy, NOISY, args.rate, args.seconds, users, BURST, shots, 99
        )
    document = {
        "shots": [[shot.status, shot.latency_s] for shot in shots],
        "cpu_s": time.process_time() - cpu_before,
    }
    args.shots.write_text(json.dumps(document))


def latencies_ms(shots: Sequence[Shot], tenant: str, status: int | None = None) -> list[float]:
    return [
        s.latency_s * 1000
        for s in shots
        if s.tenant == tenant and (status is None or s.status == status)
    ]


def summarise(
    phases: Sequence[Phase],
    before: Mapping[str, quota_pb2.TenantUsage],
    usage: Mapping[str, quota_pb2.TenantUsage],
    args: argparse.Namespace,
) -> dict[str, Any]:
    _, at_quota, burst = phases
    steady = {phase.name: latencies_ms(phase.shots, STEADY, 200) for phase in phases}
    noisy = [s for s in burst.shots if s.tenant == NOISY]
    statuses = Counter(s.status for s in noisy)
    refused_client = latencies_ms(burst.shots, NOISY, 429)
    p99_alone, p99_quota, p99_burst = (percentile(steady[p.name], 99) for p in phases)
    server_p50 = quantile(burst.refusal_buckets, 0.50)
    server_p99 = quantile(burst.refusal_buckets, 0.99)
    return {
        "steady": {
            phase.name: {
                "sent": sum(1 for s in phase.shots if s.tenant == STEADY),
                "statuses": dict(Counter(s.status for s in phase.shots if s.tenant == STEADY)),
                "p50_ms": percentile(steady[phase.name], 50),
                "p99_ms": percentile(steady[phase.name], 99),
            }
            for phase in phases
        },
        "p99_ratio": (p99_burst / p99_alone) if p99_alone and p99_burst else None,
        "p99_ratio_to_quota": (p99_burst / p99_quota) if p99_quota and p99_burst else None,
        "noisy_at_quota": dict(Counter(s.status for s in at_quota.shots if s.tenant == NOISY)),
        "noisy": {
            "rate": args.quota_b * args.factor,
            "sent": len(noisy),
            "statuses": dict(statuses),
            "refused_share": statuses[429] / len(noisy) if noisy else None,
            "server_refusal_p50_ms": None if server_p50 is None else server_p50 * 1000,
            "server_refusal_p99_ms": None if server_p99 is None else server_p99 * 1000,
            "server_refusals": burst.refusal_buckets[-1][1] if burst.refusal_buckets else 0,
            "client_refusal_p50_ms": percentile(refused_client, 50),
            "client_refusal_p99_ms": percentile(refused_client, 99),
        },
        "cpu_per_s": {
            phase.name: {n: s / phase.seconds for n, s in sorted(phase.cpu_s.items())}
            for phase in phases
        },
        "metered": metered(phases, before, usage),
        "usage": {
            tenant: {
                "allowed": row.allowed,
                "rejected": row.rejected,
                "costed_requests": row.costed_requests,
                "retrieval_cpu_ms": row.retrieval_cpu_ms,
                "ranking_cpu_ms": row.ranking_cpu_ms,
                "candidates_scored": row.candidates_scored,
            }
            for tenant, row in usage.items()
        },
    }


def metered(
    phases: Sequence[Phase],
    before: Mapping[str, quota_pb2.TenantUsage],
    usage: Mapping[str, quota_pb2.TenantUsage],
) -> dict[str, float]:
    """Over the measured phases: requests costed, the CPU ms per request ``GetUsage`` holds
    for retrieval and ranking (their handlers, metered), and the CPU ms per request the two
    processes spent in all (the handlers, gRPC's own work, the interceptor, idle overhead)."""
    requests = sum(usage[t].costed_requests - before[t].costed_requests for t in usage)
    handlers = sum(
        usage[t].retrieval_cpu_ms + usage[t].ranking_cpu_ms
        - before[t].retrieval_cpu_ms - before[t].ranking_cpu_ms
        for t in usage
    )  # fmt: skip
    processes = sum(
        phase.cpu_s.get(name, 0.0) for phase in phases for name in ("retrieval", "ranking")
    )
    return {
        "requests": requests,
        "handlers_ms_per_request": handlers / requests if requests else 0.0,
        "processes_ms_per_request": processes * 1000 / requests if requests else 0.0,
    }


def render(result: dict[str, Any], args: argparse.Namespace, run: list[str]) -> list[str]:
    steady, noisy = result["steady"], result["noisy"]
    ratio = result["p99_ratio"]
    p99_ok = ratio is not None and ratio <= 1.2
    refusal = noisy["server_refusal_p99_ms"]
    refusal_ok = refusal is not None and refusal <= 1.0
    lines = [
        "# A noisy tenant",
        "",
        f"Tenant A (`{STEADY}`) at {args.rate_a:g} recommendations/s, {args.rounds} rounds of "
        f"{args.seconds:g} s alone, {args.seconds:g} s beside tenant B (`{NOISY}`, quota "
        f"{args.quota_b:g}/s, burst {max(1, round(args.quota_b))}) sending its quota, and "
        f"{args.seconds:g} s beside B sending {noisy['rate']:g}/s ({args.factor:g}x its "
        "quota), in turn; each phase's figures over its rounds. "
        "Open loop, HTTP, 10 items per answer; latencies as A's client saw them (B is driven "
        "by a process of its own).",
        "",
        *table(
            ["tenant A", "sent", "answers", "p50 ms", "p99 ms"],
            "lrlrr",
            [
                [
                    name,
                    row["sent"],
                    ", ".join(f"{k}: {v}" for k, v in sorted(row["statuses"].items())),
                    ms(row["p50_ms"], 1),
                    ms(row["p99_ms"], 1),
                ]
                for name, row in steady.items()
            ],
        ),
        "",
        f"- A's p99 beside B at 20x / alone: **{ratio:.2f}** "
        f"(target at most 1.20: {'met' if p99_ok else 'not met'})"
        if ratio is not None
        else "- A's p99 ratio: not measured",
        f"- A's p99 beside B at 20x / beside B at its quota: "
        f"**{result['p99_ratio_to_quota'] or float('nan'):.2f}** (what the refusals "
        "themselves add; B's answers at its quota: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(result["noisy_at_quota"].items()))
        + ")",
        f"- B: {noisy['sent']} sent, answers "
        + ", ".join(f"{k}: {v}" for k, v in sorted(noisy["statuses"].items()))
        + f"; refused (429) share **{(noisy['refused_share'] or 0) * 100:.1f} %**",
        f"- the gateway's time to refuse one of B's requests (server side, "
        f'`{REFUSAL_METRIC}{{status="429"}}`, {noisy["server_refusals"]:.0f} refusals): '
        f"p50 **{ms(noisy['server_refusal_p50_ms'], 3)} ms**, p99 "
        f"**{ms(refusal, 3)} ms** (target ~1 ms: {'met' if refusal_ok else 'not met'})",
        f"- the same refusals as B's client saw them (connection, HTTP parsing, the client's "
        f"own loop): p50 {ms(noisy['client_refusal_p50_ms'], 2)} ms, p99 "
        f"{ms(noisy['client_refusal_p99_ms'], 2)} ms",
        "",
        "CPU (cores) of each process, per phase:",
        "",
    ]
    names = sorted({name for cpu in result["cpu_per_s"].values() for name in cpu})
    lines += table(
        ["process", *result["cpu_per_s"]],
        "l" + "r" * len(result["cpu_per_s"]),
        [
            [name, *(f"{cpu.get(name, 0.0):.2f}" for cpu in result["cpu_per_s"].values())]
            for name in names
        ],
    )
    cost = result["metered"]
    share = (
        cost["handlers_ms_per_request"] / cost["processes_ms_per_request"]
        if cost["processes_ms_per_request"]
        else 0.0
    )
    lines += [
        "",
        f"Cost per request over the measured phases ({cost['requests']} requests costed): "
        f"retrieval and ranking's handlers, as `GetUsage` holds them, "
        f"{cost['handlers_ms_per_request']:.2f} ms of CPU; the two processes in all "
        f"{cost['processes_ms_per_request']:.2f} ms ({share:.0%} of it metered; the rest is "
        "gRPC's own work, the server interceptor and the processes' idle work).",
    ]
    lines += ["", "The quota service's usage at the end (`GetUsage`, current hour):", ""]
    lines += table(
        ["tenant", "units granted", "denied calls", "costed requests", "CPU ms/request"],
        "lrrrr",
        [
            [
                tenant,
                row["allowed"],
                row["rejected"],
                row["costed_requests"],
                f"{(row['retrieval_cpu_ms'] + row['ranking_cpu_ms']) / row['costed_requests']:.2f}"
                if row["costed_requests"]
                else "—",
            ]
            for tenant, row in sorted(result["usage"].items())
        ],
    )
    return [*lines, "", *run]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.abuse", description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root to serve")
    parser.add_argument("--rate-a", type=float, default=30.0, help="tenant A's requests/s")
    parser.add_argument("--quota-b", type=float, default=5.0, help="tenant B's quota, /s")
    parser.add_argument("--factor", type=float, default=20.0, help="B's rate over its quota")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the three phases")
    parser.add_argument("--warm-up", type=float, default=10.0, help="A alone before measuring")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs/bench/abuse.md")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    # B's driver process (start_noisy), not for the command line.
    parser.add_argument("--drive-noisy", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--user-format", default="u{row}", help=argparse.SUPPRESS)
    parser.add_argument("--shots", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.drive_noisy:
        asyncio.run(drive_noisy(args))
        return 0
    command = command_line("loadtest.abuse", argv if argv is not None else sys.argv[1:])
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = "load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    explicit = args.artifacts
    if explicit is None and usable_set(PROJECT_ROOT / "artifacts") is not None:
        explicit = PROJECT_ROOT / "artifacts"
    with run_directory("abuse-", args.keep) as base:
        artifacts = prepare_artifacts(explicit, base, items=20_000, users=5_000)
        tenants = write_tenants(base / "tenants.json", KEYS, rate=100_000, burst=100_000)
        document = json.loads(tenants.read_text())
        document["tenants"][NOISY].update(
            {"rate": args.quota_b, "burst": max(1, round(args.quota_b))}
        )
        tenants.write_text(json.dumps(document))
        n_users, user_format = n_users_of(artifacts)
        users = [user_format.format(row=row) for row in range(n_users)]
        with running_mesh(mesh_layout(base, artifacts, tenants, QUIET_ENV)) as target:
            phases, before = asyncio.run(measure(target, args, users, user_format))
            usage = asyncio.run(usage_of(target))
        result = summarise(phases, before, usage, args)
        run = run_section(
            command, started, machine(), load, describe_artifacts(artifacts, explicit)
        )
    lines = render(result, args, run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
