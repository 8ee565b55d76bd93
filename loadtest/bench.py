"""``python -m loadtest.bench``: per-stage latency of the funnel at a fixed rate.

The run trains a small artifact set (seeded, so every run serves the same models) unless
``--artifacts`` names one, starts its own mesh as processes (:mod:`loadtest.harness`: a
temporary var directory, free ports, its own Redis and tenant registry), and drives
it open-loop: request ``i`` of a phase is sent at ``start + i / rate`` whether or not the
earlier ones answered, so a slow mesh shows up as latency instead of a lower rate. Every
request asks for ``debug`` output, and the per-stage figures come from the stage reports
the services return (retrieval's and ranking's ``StageReport`` messages and the gateway's
``stage_ms``); end-to-end latency is measured by the client.

Phases (each after a warm-up that is not recorded):

* ``http``: ``POST /v1/recommend`` with the gateway's default deadline (100 ms);
* ``grpc-<D>ms`` for each ``--tight-deadlines-ms`` (15 and 30 by default): gRPC
  ``Recommend`` with that deadline, to show the funnel degrading instead of failing.

The report, with the command and the machine, goes to ``docs/bench/stages.md`` (linked
from ``docs/benchmarks.md``, which the step benchmark ``python -m loadtest.steps`` writes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.harness import (
    QUIET_ENV,
    machine,
    mesh_layout,
    prepare_artifacts,
    running_mesh,
    write_tenants,
)
from mesh.paths import PROJECT_ROOT

TENANT = "bench"
RANKING_STAGES = ("item_features", "prerank", "heavy", "rerank")
RETRIEVAL_STAGES = ("user_features", "ann", "popular", "merge")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One measured stretch of load."""

    name: str
    api: str  # "http" or "grpc"
    rate: float
    duration_s: float
    deadline_ms: float | None = None  # None: the gateway's default deadline


@dataclasses.dataclass
class Sample:
    """What one request saw."""

    ok: bool
    status: str
    e2e_ms: float
    items: int = 0
    stage_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    degraded: list[str] = dataclasses.field(default_factory=list)
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    scored: float | None = None
    cache_hits: float = 0.0
    considered: float = 0.0


def stage_figures(stages: Sequence[dict[str, Any]], gateway_ms: dict[str, float]) -> Sample:
    """A sample's per-stage fields from its stage reports (dicts) and the gateway's stage_ms.

    Retrieval's reports come first, then ranking's, which always open with its own
    ``user_features`` followed by ``item_features``; names are prefixed with the service.
    """
    sample = Sample(ok=True, status="OK", e2e_ms=0.0)
    sample.stage_ms.update({f"gateway.{k}": v for k, v in gateway_ms.items()})
    service = "retrieval"
    for index, report in enumerate(stages):
        name = report["stage"]
        following = stages[index + 1]["stage"] if index + 1 < len(stages) else ""
        if name in RANKING_STAGES or (name == "user_features" and following == "item_features"):
            service = "ranking"
        key = f"{service}.{name}"
        sample.stage_ms[key] = float(report.get("elapsed_ms", 0.0))
        if report.get("degraded"):
            sample.reasons[key] = str(report.get("reason", ""))
        details = report.get("details") or {}
        if key == "ranking.heavy":
            sample.scored = float(details.get("scored", report.get("candidates_in", 0)))
        if key == "ranking.item_features":
            sample.cache_hits = float(details.get("cache_hits", 0.0))
            sample.considered = float(report.get("candidates_in", 0))
    return sample


async def drive(
    phase: Phase, send: Callable[[int], Awaitable[Sample]], max_in_flight: int = 512
) -> tuple[list[Sample], float]:
    """Send ``rate * duration_s`` requests open-loop; returns the samples and the wall time.

    A request that would exceed ``max_in_flight`` outstanding ones is recorded as
    ``SHED`` (client overload) rather than queued, so the schedule stays honest.
    """
    total = round(phase.rate * phase.duration_s)
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int) -> None:
        samples.append(await send(i))

    for i in range(total):
        delay = start + i / phase.rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            samples.append(Sample(ok=False, status="SHED", e2e_ms=0.0))
            continue
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return samples, loop.time() - start


def http_sender(url: str, api_key: str, n_users: int, seed: int) -> Any:
    """A ``send(i)`` for ``POST /v1/recommend`` and the session it needs (close it)."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=5)
    )
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=1_000_000)

    async def send(i: int) -> Sample:
        body = {"user_id": f"u{users[i % users.size]}", "num_items": 10, "debug": True}
        started = time.perf_counter()
        try:
            async with session.post(
                url + "/v1/recommend", json=body, headers={"x-api-key": api_key}
            ) as response:
                payload = await response.json()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Sample(False, type(exc).__name__, (time.perf_counter() - started) * 1000)
        e2e = (time.perf_counter() - started) * 1000
        if status != 200:
            return Sample(False, str(status), e2e)
        sample = stage_figures(payload.get("stages", []), payload.get("stage_ms", {}))
        sample.e2e_ms = e2e
        sample.items = len(payload["items"])
        sample.degraded = list(payload["degraded"])
        return sample

    return send, session


def grpc_sender(port: int, api_key: str, n_users: int, seed: int, deadline_ms: float) -> Any:
    """A ``send(i)`` for gRPC ``Recommend`` with a deadline, and its channel (close it)."""
    import grpc
    from google.protobuf.json_format import MessageToDict
    from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=1_000_000)

    async def send(i: int) -> Sample:
        request = gateway_pb2.RecommendRequest(
            user_id=f"u{users[i % users.size]}", num_items=10, debug=True
        )
        started = time.perf_counter()
        try:
            reply = await stub.Recommend(
                request, timeout=deadline_ms / 1000, metadata=(("x-api-key", api_key),)
            )
        except grpc.aio.AioRpcError as exc:
            return Sample(False, exc.code().name, (time.perf_counter() - started) * 1000)
        e2e = (time.perf_counter() - started) * 1000
        stages = [
            {**MessageToDict(s, preserving_proto_field_name=True), "stage": s.stage}
            for s in reply.stages
        ]
        sample = stage_figures(stages, dict(reply.stage_ms))
        sample.e2e_ms = e2e
        sample.items = len(reply.items.item_ids)
        sample.degraded = list(reply.degraded)
        return sample

    return send, channel


@dataclasses.dataclass
class Summary:
    """The figures of one phase."""

    phase: Phase
    wall_s: float
    sent: int
    ok: int
    errors: Counter[str]
    e2e: tuple[float, float, float]
    stages: dict[str, tuple[float, float, int]]
    degraded: Counter[str]
    reasons: Counter[str]
    short_lists: int
    heavy_scored: tuple[float, float] | None
    cache_hit_rate: float | None


def _p(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summarise(phase: Phase, samples: list[Sample], wall_s: float) -> Summary:
    """Percentiles (p50, p99) per stage and end to end, errors and degradations."""
    ok = [s for s in samples if s.ok]
    names = sorted({k for s in ok for k in s.stage_ms})
    stages = {
        name: (
            _p([s.stage_ms[name] for s in ok if name in s.stage_ms], 50),
            _p([s.stage_ms[name] for s in ok if name in s.stage_ms], 99),
            sum(1 for s in ok if name in s.stage_ms),
        )
        for name in names
    }
    e2e = [s.e2e_ms for s in ok]
    scored = [s.scored for s in ok if s.scored is not None]
    considered = sum(s.considered for s in ok)
    reasons: Counter[str] = Counter()
    for s in ok:
        for key, text in s.reasons.items():
            reasons[f"{key}: {_reason_kind(text)}"] += 1
    return Summary(
        phase=phase,
        wall_s=wall_s,
        sent=len(samples),
        ok=len(ok),
        errors=Counter(s.status for s in samples if not s.ok),
        e2e=(_p(e2e, 50), _p(e2e, 99), max(e2e) if e2e else float("nan")),
        stages=stages,
        degraded=Counter(d for s in ok for d in s.degraded),
        reasons=reasons,
        short_lists=sum(1 for s in ok if s.items < 10),
        heavy_scored=(_p(scored, 50), _p(scored, 1)) if scored else None,
        cache_hit_rate=sum(s.cache_hits for s in ok) / considered if considered else None,
    )


def _reason_kind(text: str) -> str:
    """The reason without its numbers, so reasons group ("heavy-scored N of M ...")."""
    for prefix in ("heavy-scored", "pre-ranked", "no time", "diversified", "item features"):
        if text.startswith(prefix):
            return prefix
    return text.split(";")[0][:40]


def _ms(value: float) -> str:
    return "—" if value != value else f"{value:.2f}"


STAGE_ORDER = [
    "gateway.admission",
    "gateway.retrieval",
    "retrieval.user_features",
    "retrieval.ann",
    "retrieval.popular",
    "retrieval.merge",
    "gateway.ranking",
    "ranking.user_features",
    "ranking.item_features",
    "ranking.prerank",
    "ranking.heavy",
    "ranking.rerank",
]


def to_markdown(
    summaries: Sequence[Summary], run: dict[str, Any], command: str, box: dict[str, str]
) -> str:
    """The report: command, machine, set-up, then a table per phase."""
    lines = [
        "# Per-stage benchmark",
        "",
        "Per-stage and end-to-end latency of `POST /v1/recommend` (and gRPC `Recommend`) at a",
        "fixed request rate, written by `python -m loadtest.bench` (see its docstring; the",
        "throughput steps are in [the benchmarks](../benchmarks.md)). Stage times are what",
        "each service reported in its debug stage reports; `gateway.*` rows are the",
        "gateway's own `stage_ms` (a downstream call including the network); end-to-end",
        "is measured by the client. Every process of the mesh, the Redis server and the",
        "load generator share the machine below.",
        "",
        "## Run",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {run['started']}",
        f"- machine: {box['cpu']}, {box['memory']} RAM, {box['os']}",
        f"- load average: {run['load']}",
        f"- software: Python {box['python']}, {box['libraries']}; commit {box['commit']}",
        f"- artifact set: {run['artifacts']}",
        f"- mesh start-up: {run['startup_s']:.1f} s; warm-up per phase: {run['warmup_s']:.0f} s "
        "(not recorded)",
        "- load: open loop (request *i* is sent at *i*/rate whatever the earlier ones do), "
        "users drawn uniformly, 10 items per request, `debug` on",
        "",
    ]
    for summary in summaries:
        phase = summary.phase
        deadline = f"{phase.deadline_ms:g} ms" if phase.deadline_ms else "gateway default (100 ms)"
        achieved = summary.sent / summary.wall_s if summary.wall_s else 0.0
        errors = ", ".join(f"{k} {v}" for k, v in summary.errors.most_common()) or "none"
        lines += [
            f"## Phase `{phase.name}`: {phase.api.upper()}, {phase.rate:g} requests/s for "
            f"{phase.duration_s:g} s, deadline {deadline}",
            "",
            f"- requests: {summary.sent} sent ({achieved:.1f}/s achieved), {summary.ok} answered "
            f"200/OK; errors: {errors}",
            f"- answers with fewer than 10 items: {summary.short_lists}",
            f"- end to end: p50 {_ms(summary.e2e[0])} ms, p99 {_ms(summary.e2e[1])} ms, "
            f"max {_ms(summary.e2e[2])} ms",
        ]
        if summary.cache_hit_rate is not None:
            lines.append(
                f"- ranking item feature cache hit rate: {100 * summary.cache_hit_rate:.1f} %"
            )
        if summary.heavy_scored is not None:
            lines.append(
                f"- candidates the heavy ranker scored: median {summary.heavy_scored[0]:.0f}, "
                f"1st percentile {summary.heavy_scored[1]:.0f}"
            )
        degraded = (
            ", ".join(
                f"`{k}` {100 * v / max(1, summary.ok):.1f} %"
                for k, v in summary.degraded.most_common()
            )
            or "none"
        )
        lines.append(f"- answers naming a degraded stage: {degraded}")
        if summary.reasons:
            reasons = ", ".join(f"{k} ({v})" for k, v in summary.reasons.most_common(6))
            lines.append(f"- degradation reasons: {reasons}")
        lines += ["", "| stage | p50 ms | p99 ms | requests |", "|---|---:|---:|---:|"]
        names = [n for n in STAGE_ORDER if n in summary.stages]
        names += sorted(n for n in summary.stages if n not in STAGE_ORDER)
        for name in names:
            p50, p99, count = summary.stages[name]
            lines.append(f"| {name} | {_ms(p50)} | {_ms(p99)} | {count} |")
        lines.append(
            f"| **end to end (client)** | **{_ms(summary.e2e[0])}** | **{_ms(summary.e2e[1])}** "
            f"| {summary.ok} |"
        )
        lines.append("")
    lines += [
        "## Reading the figures",
        "",
        "- The `requests` column counts the answers in which the stage ran: ranking's stages",
        "  are missing from answers where ranking was skipped or failed (the gateway served",
        "  retrieval order and named `ranking` in `degraded`).",
        "- Ranking's stage budgets are 10 ms (item features), 5 ms (pre-rank), 25 ms (heavy)",
        "  and 5 ms (re-rank), each capped by what is left of the request's deadline after the",
        "  reply margin and the reserves of later stages (`docs/ranking.md`). Under a tight",
        "  deadline the heavy ranker's budget is what remains after admission and retrieval,",
        "  so it scores a prefix of the pre-rank order or is skipped, and says so.",
        "- An error in a tight-deadline phase is an answer that did not reach the client",
        "  before its deadline (`DEADLINE_EXCEEDED`), whichever hop spent the time.",
        "- The machine is shared: figures move with the load average recorded above (on the",
        "  2-CPU development machine, the 30 ms phase answered 598 of 600 requests in time at",
        "  load 3.4 and 349 of 600 at load 6.5). Compare runs made at similar load.",
        "",
    ]
    return "\n".join(lines)


async def run_phases(
    layout: Any, api_key: str, n_users: int, phases: Sequence[Phase], warmup_s: float, seed: int
) -> list[Summary]:
    summaries = []
    for number, phase in enumerate(phases):
        if phase.api == "http":
            send, closer = http_sender(
                f"http://127.0.0.1:{layout.http_port}", api_key, n_users, seed + number
            )
        else:
            send, closer = grpc_sender(
                layout.ports["gateway"], api_key, n_users, seed + number, phase.deadline_ms or 100
            )
        try:
            if warmup_s > 0:
                await drive(dataclasses.replace(phase, duration_s=warmup_s), send)
            print(f"phase {phase.name}: {phase.rate:g}/s for {phase.duration_s:g} s", flush=True)
            samples, wall = await drive(phase, send)
        finally:
            await closer.close()
        summary = summarise(phase, samples, wall)
        print(
            f"  ok {summary.ok}/{summary.sent}, e2e p50 {summary.e2e[0]:.2f} ms "
            f"p99 {summary.e2e[1]:.2f} ms, degraded {dict(summary.degraded)}",
            flush=True,
        )
        summaries.append(summary)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="unrecorded seconds per phase")
    parser.add_argument(
        "--tight-deadlines-ms",
        default="15,30",
        help="comma-separated deadlines of the gRPC phases (empty: none)",
    )
    parser.add_argument("--artifacts", type=Path, help="artifact root to serve (default: train)")
    parser.add_argument("--items", type=int, default=10000, help="items of the trained set")
    parser.add_argument("--users", type=int, default=2000, help="users of the trained set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the user draw")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "bench" / "stages.md")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)

    from core.artifacts import load_artifact_set, resolve_current

    deadlines = [float(d) for d in args.tight_deadlines_ms.split(",") if d.strip()]
    phases = [Phase("http", "http", args.rate, args.duration)] + [
        Phase(f"grpc-{d:g}ms", "grpc", args.rate, args.duration, d) for d in deadlines
    ]
    command = (
        "python -m loadtest.bench " + " ".join(argv if argv is not None else sys.argv[1:]).strip()
    )
    started = datetime.now(UTC).isoformat(timespec="seconds")
    base = Path(tempfile.mkdtemp(prefix="recmesh-bench-"))
    try:
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        current = load_artifact_set(resolve_current(artifacts), verify=False)
        config = current.config
        api_key = "bench-" + secrets.token_hex(12)
        print(f"bench run in {base}; starting the mesh ...", flush=True)
        t_up = time.monotonic()
        tenants = write_tenants(base / "tenants.json", {TENANT: api_key})
        layout = mesh_layout(base, artifacts, tenants, QUIET_ENV)
        with running_mesh(layout):
            startup_s = time.monotonic() - t_up
            load_before = os.getloadavg()
            summaries = asyncio.run(
                run_phases(layout, api_key, int(config["n_users"]), phases, args.warmup, args.seed)
            )
            load_after = os.getloadavg()
        run = {
            "load": f"{load_before[0]:.2f} when the first phase started, {load_after[0]:.2f} "
            f"when the last ended (1-minute averages; the mesh itself adds about 1-2)",
            "started": started,
            "startup_s": startup_s,
            "warmup_s": args.warmup,
            "artifacts": f"{current.version} ({config['n_users']} users, {config['n_items']} "
            f"items, {config['n_categories']} categories"
            + (", trained by the run)" if args.artifacts is None else f", from {args.artifacts})"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(to_markdown(summaries, run, command.strip(), machine()))
        print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"run directory kept: {base}")
        else:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
