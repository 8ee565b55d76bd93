"""``python -m loadtest.projector_bench``: the figures of the event log and the projector
(``docs/events.md``, "Figures").

Starts the mesh as processes (its own Valkey, free ports; :mod:`loadtest.harness`) with
two tenants, ``bench`` and ``rebuild``, and runs the parts ``--parts`` names, in the order
named (a part named twice runs twice), printing one Markdown table each:

* ``ingest`` — sustained ingest through ``POST /v1/events``: ``--clients`` closed-loop
  clients, each posting ``batch`` events (20 % clicks, the rest impressions) as soon as
  its previous post was answered, for ``--seconds``, per batch size of ``--batches``.
  Accepted events/s (202s), post latency, and whether the log kept pace: the events it
  gained per second over the same window, and how long after the last post it held
  every accepted event (outbox → relay → events service → stream) and the projector had
  read them all (lag 0).
* ``impressions`` — the impressions of the gateway's own answers: recommendations at each
  rate of ``--rec-rates`` (open loop, 10 items each) for ``--seconds``; impressions
  logged per second and how long after the last answer the log held them all.
* ``lag`` — the projector's lag at each rate of ``--rates`` events/s posted open loop
  (:func:`loadtest.ingest.post_steadily`, 100 posts a second): every 10 ms the lag as
  the projector defines and publishes it (``StreamProjector.lag``: entries the group has
  not read, and the age of the oldest of them; its gauges are set from it once a second),
  p50/p99/max over the samples; and, for about 100 events a second, the time from the
  event's append (its stream position's milliseconds) to its applied mark appearing
  (polled every 5 ms, so each figure is up to 5 ms late).
* ``throughput`` — what the projector applies when it has a backlog: with the projector
  stopped (SIGSTOP), ``--backlog`` realistic events (answers of ten impressions with
  their lineage, a click on a fifth of them, a conversion on a fiftieth) are appended
  to ``bench``'s log through the events service's own append
  (``RedisStreamEventLog.append``, 500 a call); then SIGCONT and the time until the
  group read and acknowledged every entry, and the CPU the projector and Valkey spent
  per event meanwhile (the figure that does not depend on what else the machine runs).
  Also the append rate, and how often Valkey delayed an AOF write for a slow fsync.
* ``rebuild`` — the projector stopped (SIGTERM) for good, ``--rebuild-events`` realistic
  events appended to ``rebuild``'s log the same way, then ``rebuild.rebuild`` from the
  start of the log into a namespace (the projector's Lua, 500 entries a call) and
  ``batch.recompute`` (the rules in Python) timed, the namespace compared with the
  recompute, and the Valkey process's memory (``used_memory``, RSS) before the fill,
  after it and after the rebuild.

CPU is per process (psutil, user + system) over each window. The load generator runs on
the same machine and shares its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiohttp

# psutil (installed with locust) ships no annotations; types-psutil is not a dependency.
import psutil  # type: ignore[import-untyped]
from recmesh.common.v1 import common_pb2
from recmesh.events.v1 import events_pb2

from core import keys
from core.artifacts import load_artifact_set, resolve_current
from core.logread import as_text
from core.replay import appended_ms
from loadtest.harness import Target, mesh_layout, prepare_artifacts, running_mesh, write_tenants
from loadtest.ingest import Post, event_batch, post, post_steadily, session
from loadtest.reporting import percentile, table
from loadtest.runs import add_run_options, run_directory
from loadtest.traffic import ZipfUsers, n_users_of
from mesh import redis as mesh_redis
from mesh.redis import AsyncRedis
from mesh.settings import load
from ops import processes
from services.events.log import RedisStreamEventLog
from services.projector import batch, rebuild
from services.projector.consumer import StreamProjector
from services.projector.projections import Projections
from services.projector.settings import ProjectorSettings

TENANT = "bench"
REBUILD_TENANT = "rebuild"
PARTS = ("ingest", "impressions", "lag", "throughput", "rebuild")
APPEND_BATCH = 500
LAG_SAMPLE_S = 0.01
TRACK_S = 0.005
TRACKED_PER_S = 100
"""Events a second followed from their append to their application (``lag``)."""
SETTLE_S = 120.0
"""Longest wait for the log or the projector to catch up after a part's load."""
VERSION = "20261204T193516.870050Z-320ff5f5"
"""An artifact-set version as impressions carry it (the realistic events' lineage)."""


@dataclass
class Context:
    """What every part works with."""

    target: Target
    url: str
    api_key: str
    redis: AsyncRedis
    projector: ProjectorSettings
    users: ZipfUsers
    n_items: int
    args: argparse.Namespace

    def pid(self, name: str) -> int | None:
        return processes.running_pid(self.target.layout.run_dir, name)


class CpuWatch:
    """CPU seconds per second between :meth:`start` and :meth:`stop`: of the processes
    :data:`SHOWN` (a process not running at both ends is left out), and the share of the
    host's CPUs that was busy, and busy with processes other than the mesh's and this
    benchmark's (the machine is shared)."""

    SHOWN = ("gateway", "events", "projector", "redis", "bench")

    def __init__(self, context: Context) -> None:
        self._context = context
        self._begin: dict[str, float] = {}
        self._t0 = 0.0
        self.rates: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for name in (*processes.MODULES, processes.REDIS, "bench"):
            pid = os.getpid() if name == "bench" else self._context.pid(name)
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                found[name] = float(times.user + times.system)
        host = psutil.cpu_times()
        found["host"] = float(host.user + host.nice + host.system + host.irq + host.softirq)
        found["host"] += float(host.steal)
        found["iowait"] = float(host.iowait)
        return found

    def start(self) -> None:
        self._t0, self._begin = time.monotonic(), self._now()

    def stop(self) -> dict[str, float]:
        elapsed, end = time.monotonic() - self._t0, self._now()
        self.rates = {n: (end[n] - self._begin[n]) / elapsed for n in end if n in self._begin}
        return self.rates

    def cells(self) -> list[str]:
        cpus = os.cpu_count() or 1
        ours = sum(v for n, v in self.rates.items() if n not in ("host", "iowait"))
        host = min(self.rates.get("host", 0.0), float(cpus))  # samples a tick apart
        return [
            *(f"{self.rates[n]:.2f}" if n in self.rates else "—" for n in self.SHOWN),
            f"{100 * host / cpus:.0f} % ({100 * max(0.0, host - ours) / cpus:.0f} %)",
            f"{100 * self.rates.get('iowait', 0.0) / cpus:.0f} %",
        ]


CPU_HEADER = [
    "CPU s/s gateway",
    "events",
    "projector",
    "Valkey",
    "load generator",
    "host CPUs busy (others)",
    "iowait",
]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until ``check()`` was true (polled every 50 ms); None after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def group_state(context: Context, tenant: str) -> tuple[int | None, int]:
    """``(lag, pending)`` of the projector's group on ``tenant``'s log."""
    groups: list[dict[str, Any]] = await context.redis.xinfo_groups(keys.events(tenant))
    info = next(
        (g for g in groups if as_text(g["name"]) == context.projector.group),
        None,
    )
    if info is None:
        return None, 0
    lag = info.get("lag")
    return (None if lag is None else int(lag)), int(info["pending"])


async def caught_up(context: Context, tenant: str) -> bool:
    """Whether the projector read and acknowledged every entry of ``tenant``'s log."""
    lag, pending = await group_state(context, tenant)
    return lag == 0 and pending == 0


async def length(context: Context, tenant: str) -> int:
    return int(await context.redis.xlen(keys.events(tenant)))


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "not within the wait" if value is None else f"{value:.1f}"


async def log_complete(context: Context, before: int, expected: int) -> float | None:
    """Seconds until the log holds ``expected`` entries more than ``before``."""

    async def complete() -> bool:
        return await length(context, TENANT) - before >= expected

    return await wait_until(complete, SETTLE_S)


async def ingest_step(context: Context, size: int) -> list[object]:
    """One row of :func:`part_ingest`: ``--clients`` closed loops posting ``size`` events."""
    args = context.args
    before = await length(context, TENANT)
    posts: list[Post] = []
    cpu = CpuWatch(context)
    cpu.start()
    deadline = time.monotonic() + args.seconds
    async with session(context.api_key) as client:

        async def loop(number: int) -> None:
            rng = random.Random(f"bench:{size}:{number}")
            while time.monotonic() < deadline:
                now = int(time.time() * 1000)
                events = event_batch(rng, size, 0.2, context.users, context.n_items, now)
                posts.append(await post(client, context.url, events))

        started = time.monotonic()
        await asyncio.gather(*(loop(n) for n in range(args.clients)))
        elapsed = time.monotonic() - started
    cpu.stop()
    during = await length(context, TENANT) - before
    accepted = sum(len(p.ids) for p in posts if p.ok)
    logged_after = await log_complete(context, before, accepted)
    projected_after = await wait_until(lambda: caught_up(context, TENANT), SETTLE_S)
    latencies = [p.ms for p in posts if p.ok]
    return [
        size,
        args.clients,
        f"{len(posts) / elapsed:.0f}",
        f"{accepted / elapsed:.0f}",
        len(posts) - sum(p.ok for p in posts),
        _ms(percentile(latencies, 50)),
        _ms(percentile(latencies, 99)),
        f"{during / elapsed:.0f}",
        _s(logged_after),
        _s(projected_after),
        *cpu.cells(),
    ]


async def part_ingest(context: Context) -> list[str]:
    rows = [await ingest_step(context, int(b)) for b in context.args.batches.split(",")]
    header = [
        "events/post",
        "clients",
        "posts/s",
        "accepted events/s",
        "failed posts",
        "p50 ms",
        "p99 ms",
        "logged events/s (same window)",
        "all in the log after s",
        "projector lag 0 after s",
        *CPU_HEADER,
    ]
    return table(header, "r" * len(header), rows)


async def impressions_step(context: Context, rate: float) -> list[object]:
    """One row of :func:`part_impressions`: recommendations at ``rate`` a second."""
    before = await length(context, TENANT)
    shown: list[int] = []
    failed: list[str] = []
    cpu = CpuWatch(context)
    cpu.start()
    rng = random.Random(f"impressions:{rate}")
    async with session(context.api_key) as client:

        async def recommend(user: str) -> None:
            body = {"user_id": user, "num_items": 10}
            try:
                async with client.post(f"{context.url}/v1/recommend", json=body) as reply:
                    document = await reply.json()
                    if reply.status == 200:
                        shown.append(len(document.get("items", [])))
                        return
                    failed.append(str(reply.status))
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failed.append(type(exc).__name__)

        tasks = []
        started = time.monotonic()
        for k in range(int(context.args.seconds * rate)):
            await asyncio.sleep(max(0.0, started + k / rate - time.monotonic()))
            tasks.append(asyncio.create_task(recommend(context.users.draw(rng))))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    cpu.stop()
    during = await length(context, TENANT) - before
    expected = sum(shown)
    logged_after = await log_complete(context, before, expected)
    return [
        f"{rate:g}",
        f"{len(shown) / elapsed:.0f}",
        len(failed),
        f"{expected / elapsed:.0f}",
        f"{during / elapsed:.0f}",
        _s(logged_after),
        *cpu.cells(),
    ]


async def part_impressions(context: Context) -> list[str]:
    rows = [await impressions_step(context, float(r)) for r in context.args.rec_rates.split(",")]
    header = [
        "recommendations/s offered",
        "answered/s",
        "failed",
        "impressions/s shown",
        "impressions/s logged (same window)",
        "all in the log after s",
        *CPU_HEADER,
    ]
    return table(header, "r" * len(header), rows)


async def track_applied(
    context: Context, every: int, stop: asyncio.Event, delays_ms: list[float]
) -> None:
    """Until ``stop``, follow every ``every``-th entry appended to the log and record how
    long after its append (the position's milliseconds, Valkey's clock) its applied mark
    (``keys.applied``, set by the projector's apply) appeared, polling every
    :data:`TRACK_S`; what is still unapplied 1 s after ``stop`` is recorded as 1 s+."""
    stream = keys.events(TENANT)
    newest = cast(list[Any], await context.redis.xrevrange(stream, count=1))
    after = as_text(newest[0][0]) if newest else "0-0"
    waiting: dict[str, int] = {}
    seen = 0
    ended: float | None = None
    while ended is None or (waiting and time.monotonic() - ended < 1.0):
        if ended is None and stop.is_set():
            ended = time.monotonic()
        entries = cast(list[Any], await context.redis.xrange(stream, min=f"({after}", count=5000))
        for position, fields in entries:
            after = as_text(position)
            seen += 1
            if seen % every == 0:
                event = events_pb2.Event.FromString(fields[b"e"])
                waiting[event.event_id] = appended_ms(after)
        if waiting:
            ids = list(waiting)
            async with context.redis.pipeline(transaction=False) as pipe:
                for event_id in ids:
                    pipe.exists(keys.applied(TENANT, event_id))
                found = await pipe.execute()
            now_ms = time.time() * 1000.0
            for event_id, applied in zip(ids, found, strict=True):
                if applied:
                    delays_ms.append(now_ms - waiting.pop(event_id))
        await asyncio.sleep(TRACK_S)
    delays_ms += [1000.0] * len(waiting)


async def lag_step(context: Context, watcher: StreamProjector, rate: float) -> list[object]:
    """One row of :func:`part_lag`: ``rate`` events/s posted while the lag is sampled
    and a share of the events is followed to their application."""
    events: list[float] = []
    seconds: list[float] = []
    applied: list[float] = []
    posts: list[Post] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            lag = await watcher.lag(TENANT)
            events.append(float(lag.events))
            seconds.append(lag.seconds * 1000.0)
            await asyncio.sleep(LAG_SAMPLE_S)

    sampler = asyncio.create_task(sample())
    tracker = asyncio.create_task(
        track_applied(context, max(1, round(rate / TRACKED_PER_S)), stop, applied)
    )
    cpu = CpuWatch(context)
    cpu.start()
    started = time.monotonic()
    await post_steadily(
        context.url,
        context.api_key,
        rate=rate,
        batch=max(1, round(rate / 100)),
        click_share=0.2,
        users=context.users,
        n_items=context.n_items,
        on_post=posts.append,
        duration_s=context.args.seconds,
        seed=int(rate),
    )
    elapsed = time.monotonic() - started
    cpu.stop()
    stop.set()
    await sampler
    await tracker
    accepted = sum(len(p.ids) for p in posts if p.ok)
    await wait_until(lambda: caught_up(context, TENANT), SETTLE_S)
    return [
        f"{rate:g}",
        f"{accepted / elapsed:.0f}",
        len(events),
        *(_ms(percentile(events, q)) for q in (50, 99)),
        f"{max(events, default=0):.0f}",
        *(_ms(percentile(seconds, q)) for q in (50, 99)),
        _ms(max(seconds, default=None)),
        len(applied),
        *(_ms(percentile(applied, q)) for q in (50, 99)),
        _ms(max(applied, default=None)),
        *cpu.cells(),
    ]


async def part_lag(context: Context) -> list[str]:
    watcher = StreamProjector(
        context.redis,
        Projections(
            context.redis,
            context.projector.history_cap,
            context.projector.half_life_s,
            context.projector.applied_ttl_s,
        ),
        [TENANT],
        group=context.projector.group,
        consumer="bench-lag-watcher",
    )
    rows = [await lag_step(context, watcher, float(r)) for r in context.args.rates.split(",")]
    header = [
        "events/s offered",
        "accepted/s",
        "samples",
        "lag p50 entries",
        "p99 entries",
        "max entries",
        "lag p50 ms",
        "p99 ms",
        "max ms",
        "events followed",
        "append → applied p50 ms",
        "p99 ms",
        "max ms",
        *CPU_HEADER,
    ]
    return table(header, "r" * len(header), rows)


def realistic(rng: random.Random, users: ZipfUsers, items: ZipfUsers) -> list[events_pb2.Event]:
    """One answer's events as the gateway and an application log them: ten impressions
    with their lineage, a click on one of them for a fifth of the answers (position-biased),
    and a conversion of that click for a tenth of those."""
    now = int(time.time() * 1000)
    user, request = users.draw(rng), uuid.UUID(int=rng.getrandbits(128), version=4).hex
    shown = [items.draw_row(rng) for _ in range(10)]
    out = [
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
            variants={"retrieval-k": "control"},
            retrieval_version=VERSION,
            ranking_version=VERSION,
        )
        for position, item in enumerate(shown)
    ]
    if rng.random() < 0.2:
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
                    position=position,
                )
            )
    return out


async def fill(context: Context, tenant: str, count: int, seed: int) -> tuple[int, float]:
    """Append ``count`` realistic events (whole answers, so a few more) to ``tenant``'s log
    through the events service's append; returns how many and the seconds it took."""
    log = RedisStreamEventLog(context.redis, 7 * 24 * 3600)
    await log.prepare()
    rng = random.Random(f"fill:{tenant}:{seed}")
    items = ZipfUsers(context.n_items, 0.8, seed)
    appended = 0
    pending: list[events_pb2.Event] = []
    started = time.monotonic()
    while appended + len(pending) < count:
        pending += realistic(rng, context.users, items)
        if len(pending) >= APPEND_BATCH:
            appended += (await log.append(tenant, pending)).appended
            pending = []
    if pending:
        appended += (await log.append(tenant, pending)).appended
    return appended, time.monotonic() - started


async def part_throughput(context: Context) -> list[str]:
    args = context.args
    run_dir = context.target.layout.run_dir
    await wait_until(lambda: caught_up(context, TENANT), SETTLE_S)
    processes.send(run_dir, "projector", signal.SIGSTOP)
    try:
        appended, append_s = await fill(context, TENANT, args.backlog, 1)
        lag, _ = await group_state(context, TENANT)
    finally:
        processes.send(run_dir, "projector", signal.SIGCONT)
    cpu = CpuWatch(context)
    delayed = await delayed_fsyncs(context)
    cpu.start()
    drained = await wait_until(lambda: caught_up(context, TENANT), 600.0)
    cpu.stop()
    header = [
        "backlog (entries)",
        "appended/s (events service's append, 500 a call)",
        "drained in s",
        "projector applies events/s",
        "CPU µs per event: projector, Valkey",
        "Valkey delayed AOF writes",
        *CPU_HEADER,
    ]
    rate = None if drained is None or not lag else lag / drained
    per_event = (
        "—"
        if rate is None
        else ", ".join(f"{1e6 * cpu.rates.get(n, 0.0) / rate:.0f}" for n in ("projector", "redis"))
    )
    row = [
        lag,
        f"{appended / append_s:.0f}",
        _s(drained),
        "—" if rate is None else f"{rate:.0f}",
        per_event,
        await delayed_fsyncs(context) - delayed,
        *cpu.cells(),
    ]
    return table(header, "r" * len(header), [row])


async def delayed_fsyncs(context: Context) -> int:
    """Valkey's ``aof_delayed_fsync``: how many times it wrote its append-only buffer only
    after waiting (up to 2 s) for a slow background fsync, acknowledged writes held in its
    own memory meanwhile (``docs/events.md``, "Redis restarts and durability")."""
    info = cast(Mapping[str, Any], await context.redis.info("persistence"))
    return int(info.get("aof_delayed_fsync", 0))


async def memory(context: Context) -> tuple[float, float]:
    """Valkey's ``used_memory`` and the RSS of its process, MiB."""
    info = cast(Mapping[str, Any], await context.redis.info("memory"))
    pid = context.pid("redis")
    rss = psutil.Process(pid).memory_info().rss if pid is not None else 0
    return int(info["used_memory"]) / 2**20, rss / 2**20


def _max_rss_mib() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def part_rebuild(context: Context) -> list[str]:
    args = context.args
    settings = context.projector
    processes.stop(context.target.layout.run_dir, "projector", grace_s=10)
    empty = await memory(context)
    appended, append_s = await fill(context, REBUILD_TENANT, args.rebuild_events, 2)
    filled = await memory(context)
    namespace = "bench-rebuild"
    into = Projections(
        context.redis,
        settings.history_cap,
        settings.half_life_s,
        settings.applied_ttl_s,
        namespace=namespace,
    )
    cpu = CpuWatch(context)
    delayed = await delayed_fsyncs(context)
    cpu.start()
    done = await rebuild.rebuild(
        context.redis, REBUILD_TENANT, into, settings.half_life_s, from_snapshot=False
    )
    cpu.stop()
    rebuilt = await memory(context)
    rss_before = _max_rss_mib()
    started = time.monotonic()
    recomputed = await batch.recompute(
        context.redis, REBUILD_TENANT, settings.half_life_s, settings.history_cap
    )
    recompute_s = time.monotonic() - started
    rss_after = _max_rss_mib()
    differences = batch.compare(
        batch.expected(recomputed, settings.half_life_s),
        await batch.read_projections(context.redis, REBUILD_TENANT, namespace),
        settings.half_life_s,
    )
    await rebuild.drop_namespace(context.redis, REBUILD_TENANT, namespace)
    header = ["what", "events", "seconds", "events/s", "Valkey used_memory MiB", "Valkey RSS MiB"]
    rows = [
        ["log empty", 0, "—", "—", f"{empty[0]:.0f}", f"{empty[1]:.0f}"],
        [
            "fill (events service's append, 500 a call)",
            appended,
            f"{append_s:.1f}",
            f"{appended / append_s:.0f}",
            f"{filled[0]:.0f}",
            f"{filled[1]:.0f}",
        ],
        [
            f"`rebuild.rebuild` from the start into a namespace ({done.dead} dead)",
            done.replayed,
            f"{done.seconds:.1f}",
            f"{done.replayed / done.seconds:.0f}",
            f"{rebuilt[0]:.0f}",
            f"{rebuilt[1]:.0f}",
        ],
        [
            "`batch.recompute` (Python; peak RSS of the bench "
            f"{rss_before:.0f} → {rss_after:.0f} MiB)",
            appended,
            f"{recompute_s:.1f}",
            f"{appended / recompute_s:.0f}",
            "—",
            "—",
        ],
    ]
    lines = table(header, "lrrrrr", rows)
    rates = cpu.rates
    lines.append("")
    per_event = done.replayed / done.seconds
    lines.append(
        f"During the rebuild: CPU s/s Valkey {rates.get('redis', 0):.2f}, the bench (the "
        f"rebuild's Python) {rates.get('bench', 0):.2f} (CPU µs per event: Valkey "
        f"{1e6 * rates.get('redis', 0) / per_event:.0f}, Python "
        f"{1e6 * rates.get('bench', 0) / per_event:.0f}); host CPUs busy (others) "
        f"{cpu.cells()[-2]}, iowait {cpu.cells()[-1]}; Valkey delayed its AOF write "
        f"{await delayed_fsyncs(context) - delayed} times."
    )
    lines.append(
        f"rebuild vs recompute: {len(differences)} differences"
        + (f" (first: {differences[0]})" if differences else "")
    )
    return lines


RUNNERS: dict[str, Callable[[Context], Awaitable[list[str]]]] = {
    "ingest": part_ingest,
    "impressions": part_impressions,
    "lag": part_lag,
    "throughput": part_throughput,
    "rebuild": part_rebuild,
}


async def run_parts(
    target: Target, api_key: str, args: argparse.Namespace, users: ZipfUsers, n_items: int
) -> None:
    """Run the parts of ``args.parts`` against ``target`` in order, printing each table."""
    layout = target.layout
    client = mesh_redis.client(layout.effective_redis_url(), socket_timeout=30)
    try:
        context = Context(
            target,
            target.http_url,
            api_key,
            client,
            load(ProjectorSettings, layout.env()),
            users,
            n_items,
            args,
        )
        for name in args.parts.split(","):
            print(f"\n## {name}\n", flush=True)
            print("\n".join(await RUNNERS[name](context)), flush=True)
    finally:
        await client.aclose()


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"({what}: {time.monotonic() - started:.0f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.projector_bench", description=__doc__)
    add_run_options(parser)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each step")
    parser.add_argument("--batches", default="1,10,100", help="events per post (ingest)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients (ingest)")
    parser.add_argument("--rec-rates", default="50,100", help="recommendations/s (impressions)")
    parser.add_argument("--rates", default="100,1000", help="events/s (lag)")
    parser.add_argument("--backlog", type=int, default=200_000, help="events (throughput)")
    parser.add_argument("--rebuild-events", type=int, default=1_000_000, help="events (rebuild)")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    key = "bench-" + uuid.uuid4().hex
    with run_directory("recmesh-projector-bench-", args.keep) as base:
        artifacts = prepare_artifacts(args.artifacts, base, args.items, args.users)
        config = load_artifact_set(resolve_current(artifacts), verify=False).config
        n_users, id_format = n_users_of(artifacts)
        users = ZipfUsers(n_users, 0.8, 0, id_format)
        tenants = write_tenants(base / "tenants.json", {TENANT: key, REBUILD_TENANT: key + "-r"})
        layout = mesh_layout(base, artifacts, tenants, {"RECMESH_LOG_LEVEL": "WARNING"})
        with timed("whole run"), running_mesh(layout) as target:
            asyncio.run(run_parts(target, key, args, users, int(config["n_items"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
