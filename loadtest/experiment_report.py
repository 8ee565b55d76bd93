"""``python -m loadtest.experiment_report``: what an experiment report over a large log costs
(``docs/experiments.md``, "Report").

Starts its own embedded Valkey, fills the log of tenant ``bench`` with ``--events`` events
through the events service's own append (``RedisStreamEventLog.append``, 500 a call) and
times the report of ``retrieval-k`` (the development book, ``config/experiments.json``):

* the log: answers of ten impressions with the gateway's lineage (variants, degraded stages,
  latency) to ``--users`` Zipf-drawn users; the first 30 % of the answers come before the
  experiment (no variants: the CUPED covariate's period), then each user's first answer
  brings an exposure to the variant GrowthBook assigns them; a click on an answer with
  the user's own probability (uniform in [0.02, 0.6], so the past predicts the future),
  a tenth more often in ``wide`` (a known lift), a conversion on a tenth of the clicks, a
  degraded stage on 1 % of the answers and an error event on 0.1 %;
* ``in process``: ``services.experiment.report.build_report`` cold (the whole log read,
  decoded and aggregated; the read and the computation timed apart), then after
  ``--more`` events were appended (the incremental refresh), then with nothing new;
* ``service``: the experiment service built by its composition root, ``GetReport`` over
  gRPC (its worker process: cold, including the worker's start, then warm), the worker's
  RSS, and ``Assign`` latency while a cold report is computed against idle.

Prints one Markdown table and (unless ``--no-write``) puts it into ``docs/experiments.md``
between ``<!-- experiment-report: begin -->`` and ``<!-- experiment-report: end -->``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# psutil (installed with locust) ships no annotations; types-psutil is not a dependency.
import psutil  # type: ignore[import-untyped]
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.assign import assign
from core.experiments.book import ExperimentBook, load_experiments
from loadtest.reporting import command_line, percentile, table, write_block
from loadtest.traffic import ZipfUsers
from mesh import redis as mesh_redis
from mesh.paths import CONFIG_DIR, PROJECT_ROOT
from mesh.ports import free_port
from mesh.testing import built_server, channel_to, serving, tenant_metadata
from ops.redis_server import start_embedded_redis
from services.events.log import RedisStreamEventLog
from services.experiment.report import LogTable, ReportSpec, build_report, compute, refresh
from services.experiment.server import build_service
from services.experiment.settings import ExperimentSettings

TENANT = "bench"
KEY = "retrieval-k"
APPEND_BATCH = 500


class World:
    """Draws the answers of the benchmark's log (module docstring)."""

    def __init__(self, book: ExperimentBook, users: int, items: int, seed: int) -> None:
        self.book = book
        self.rng = random.Random(seed)
        self.users = ZipfUsers(users, 0.8, seed)
        self.items = ZipfUsers(items, 0.8, seed + 1)
        self.exposed: set[str] = set()
        self.variants: dict[str, dict[str, str]] = {}
        self.taste: dict[str, float] = {}

    def _assigned(self, user: str) -> dict[str, str]:
        found = self.variants.get(user)
        if found is None:
            found = self.variants[user] = {
                a.experiment_key: a.variant_key
                for a in assign(self.book, tenant=TENANT, attributes={"user_id": user})
            }
        return found

    def answer(self, experiment_on: bool) -> list[events_pb2.Event]:
        rng, now = self.rng, int(time.time() * 1000)
        user = self.users.draw(rng)
        request = uuid.UUID(int=rng.getrandbits(128), version=4).hex
        variants = self._assigned(user) if experiment_on else {}
        out: list[events_pb2.Event] = []
        if experiment_on and user not in self.exposed:
            self.exposed.add(user)
            out += [
                events_pb2.Event(
                    event_id=f"x:{user}:{key}",
                    type="exposure",
                    user_id=user,
                    request_id=request,
                    ts_ms=now,
                    variants={key: variant},
                    book_version=self.book.version,
                )
                for key, variant in variants.items()
            ]
        latency = rng.lognormvariate(3.0, 0.4)
        if rng.random() < 0.001:
            return [
                *out,
                events_pb2.Event(
                    event_id=f"{request}:error",
                    type="error",
                    user_id=user,
                    request_id=request,
                    ts_ms=now,
                    variants=variants,
                    attributes={"code": "UNAVAILABLE"},
                    latency_ms=latency,
                ),
            ]
        degraded = ["trending"] if rng.random() < 0.01 else []
        shown = [self.items.draw_row(rng) for _ in range(10)]
        out += [
            events_pb2.Event(
                event_id=f"{request}:{position}",
                type="impression",
                user_id=user,
                item_id=item,
                request_id=request,
                ts_ms=now,
                position=position,
                propensity=1.0,
                score=2.5 - 0.05 * position,
                source=common_pb2.SOURCE_ANN,
                variants=variants,
                retrieval_version="v1",
                ranking_version="v1",
                degraded=degraded,
                latency_ms=latency,
            )
            for position, item in enumerate(shown)
        ]
        taste = self.taste.get(user)
        if taste is None:
            taste = self.taste[user] = rng.uniform(0.02, 0.6)
        click_rate = taste * (1.1 if variants.get(KEY) == "wide" else 1.0)
        if rng.random() < click_rate:
            position = rng.choices(range(10), weights=[1 / (p + 1) for p in range(10)])[0]
            for kind in ("click", "conversion") if rng.random() < 0.1 else ("click",):
                out.append(
                    events_pb2.Event(
                        event_id=uuid.UUID(int=rng.getrandbits(128), version=4).hex,
                        type=kind,
                        user_id=user,
                        item_id=shown[position],
                        request_id=request,
                        ts_ms=now,
                    )
                )
        return out


async def fill(
    log: RedisStreamEventLog, world: World, count: int, pre_share: float
) -> tuple[int, float]:
    """Append about ``count`` events (whole answers) of ``world``, the first ``pre_share``
    of them before the experiment; returns how many and the seconds it took."""
    appended, pending = 0, list[events_pb2.Event]()
    started = time.monotonic()
    while appended + len(pending) < count:
        pending += world.answer(experiment_on=appended + len(pending) >= pre_share * count)
        if len(pending) >= APPEND_BATCH:
            appended += (await log.append(TENANT, pending)).appended
            pending = []
    if pending:
        appended += (await log.append(TENANT, pending)).appended
    return appended, time.monotonic() - started


async def assign_latency(
    stub: experiment_pb2_grpc.ExperimentServiceAsyncStub, until: asyncio.Future[Any]
) -> list[float]:
    """``Assign`` round trips (ms), one after another, until ``until`` is done."""
    samples: list[float] = []
    n = 0
    while not until.done():
        started = time.perf_counter()
        await stub.Assign(
            experiment_pb2.AssignRequest(user_id=f"u{n}"), metadata=tenant_metadata(TENANT)
        )
        samples.append((time.perf_counter() - started) * 1000)
        n += 1
        await asyncio.sleep(0.005)
    return samples


async def run(args: argparse.Namespace, redis_url: str) -> list[list[object]]:
    book = load_experiments(args.book)
    spec = ReportSpec.of(next(e for e in book.experiments if e.key == KEY), book.version)
    client = mesh_redis.client(redis_url)
    log = RedisStreamEventLog(client, 7 * 24 * 3600)
    await log.prepare()
    world = World(book, args.users, args.items, args.seed)
    count, fill_s = await fill(log, world, args.events, 0.3)
    rows: list[list[object]] = [
        ["log", f"{count:,} events appended in {fill_s:.1f} s ({count / fill_s:,.0f}/s)"]
    ]

    started = time.perf_counter()
    table_, read, _ = await refresh(client, TENANT, None, args.page)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    report = compute(table_, spec, TENANT)
    compute_s = time.perf_counter() - started
    wide = next(v for v in report.variants if v.variant_key == "wide")
    ctr = next(c for c in wide.comparisons if c.metric == "ctr")
    rows += [
        ["in process, cold: read + decode", f"{read:,} entries, {read_s:.2f} s"],
        ["in process, cold: compute", f"{compute_s:.2f} s"],
        [
            "report",
            f"users {[v.users for v in report.variants]}, impressions "
            f"{[v.impressions for v in report.variants]}, CTR lift "
            f"{ctr.lift.relative_lift * 100:+.1f} % (CI {ctr.lift.relative_ci.low * 100:+.1f}, "
            f"{ctr.lift.relative_ci.high * 100:+.1f}), CUPED variance "
            f"-{ctr.cuped.variance_reduction * 100:.0f} %, SRM p {report.srm.p_value:.2f}",
        ],
    ]
    more, _ = await fill(log, world, args.more, 0.0)
    warm, table_ = await build_report(client, TENANT, spec, table_, args.page)
    rows.append(
        [
            f"in process, {more:,} more events",
            f"{warm.entries_read:,} read, {warm.compute_ms:.0f} ms",
        ]
    )
    idle, _ = await build_report(client, TENANT, spec, table_, args.page, warm)
    rows.append(["in process, nothing new (the last report again)", f"{idle.compute_ms:.0f} ms"])
    rows.append(["table size", f"{_table_mib(table_):.0f} MiB of columns and interned ids"])

    settings = ExperimentSettings(
        port=0, experiments=args.book, redis_url=redis_url, report_page=args.page
    )
    server = await built_server(build_service, settings)
    async with serving(server), channel_to(server) as channel:
        stub: experiment_pb2_grpc.ExperimentServiceAsyncStub = (
            experiment_pb2_grpc.ExperimentServiceStub(channel)
        )
        idle_done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(2.0, idle_done.set_result, None)
        idle_latency = await assign_latency(stub, idle_done)
        request = experiment_pb2.GetReportRequest(experiment_key=KEY)
        started = time.perf_counter()
        call = asyncio.ensure_future(
            stub.GetReport(request, metadata=tenant_metadata(TENANT), timeout=600)
        )
        busy_latency = await assign_latency(stub, call)
        cold = await call
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        await stub.GetReport(request, metadata=tenant_metadata(TENANT), timeout=600)
        warm_s = time.perf_counter() - started
        rss = sum(
            c.memory_info().rss
            for c in psutil.Process().children(recursive=True)
            if "valkey" not in " ".join(c.cmdline())
        )
    rows += [
        [
            "service GetReport, cold (worker start, read, compute)",
            f"{cold_s:.2f} s ({cold.compute_ms / 1000:.2f} s in the worker)",
        ],
        ["service GetReport, warm", f"{warm_s * 1000:.0f} ms"],
        ["report worker RSS", f"{rss / 2**20:.0f} MiB"],
        [
            "Assign p50 / p99 idle",
            f"{percentile(idle_latency, 50):.2f} / {percentile(idle_latency, 99):.2f} ms",
        ],
        [
            "Assign p50 / p99 during a cold report",
            f"{percentile(busy_latency, 50):.2f} / {percentile(busy_latency, 99):.2f} ms "
            f"({len(busy_latency)} calls)",
        ],
    ]
    await client.aclose()
    return rows


def _table_mib(log_table: LogTable) -> float:
    kinds = [log_table.impressions, log_table.outcomes, log_table.exposures, log_table.errors]
    columns = sum(len(a) * a.itemsize for r in kinds for a in r.ints.values()) + sum(
        len(a) * a.itemsize for r in kinds for a in r.floats.values()
    )
    interned = sum(len(k) + 80 for k in log_table.users) + sum(
        len(k) + 80 for k in log_table.requests
    )
    return (columns + interned) / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.experiment_report", description=__doc__
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--more", type=int, default=10_000, help="events appended after")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--page", type=int, default=5000, help="entries per XRANGE")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--book", type=Path, default=CONFIG_DIR / "experiments.json")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="report-bench-") as work:
        port = free_port()
        valkey = start_embedded_redis(Path(work) / "data", port, Path(work) / "valkey.log")
        try:
            rows = asyncio.run(run(args, f"redis://127.0.0.1:{port}/0"))
        finally:
            valkey.terminate()
            valkey.wait(timeout=30)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    given = list(sys.argv[1:] if argv is None else argv)
    lines = [
        f"`{command_line('loadtest.experiment_report', given)}` "
        f"({os.cpu_count()} CPUs, load average {load} at the end):",
        "",
        *table(["what", "figure"], "ll", rows),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_block(PROJECT_ROOT / "docs" / "experiments.md", "experiment-report", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
