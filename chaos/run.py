"""``recmesh chaos``: break the mesh under steady load, one scenario at a time, and report.

The run starts its own mesh (``ops.supervisor``: a temporary var directory, free ports,
its own Redis and tenant registry), starts locust (:mod:`chaos.load`) at a fixed rate and
the event ingest (:mod:`chaos.ingest`, ``ingest_rate`` events/s to ``POST /v1/events``),
lets them warm up, and then, per scenario: ``pre_s`` seconds of baseline, the fault, the
fault held, the repair (:class:`chaos.control.Control`), a wait until the scenario has
recovered (judged live by :func:`chaos.figures.recovered_after`, at most ``settle_max_s``),
and ``post_s`` more seconds. Afterwards it stops the load, waits for the outbox to
drain, reads the event log back, waits for the projector to catch up and checks its
projections against a recount from the log (:func:`chaos.observe.check_projections`),
stops the mesh, and writes ``docs/chaos.md``,
``docs/chaos/report.json`` and one PNG per scenario. The exit status is 1 when a bar was
missed. Raw observations stay in the run directory (``--keep``), and
``--reanalyse <dir>`` rebuilds the report from them without running anything.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos.bars import build
from chaos.control import TENANT, Control, canary, ingest, load_generator
from chaos.figures import STALL_MS, Evidence, Marks, impression_ids, recovered_after
from chaos.render import findings, to_json, to_markdown
from chaos.scenarios import Scenario, default_scenarios, select
from chaos.timeline import GroupSample, HealthSample, ProjectorCheck, Request, Sample, other_cpu
from loadtest.harness import mesh_layout, write_tenants
from loadtest.ingest import Post
from loadtest.traffic import PER_USER_RATE
from mesh.paths import ARTIFACTS_DIR, PROJECT_ROOT
from training.find import find_or_train


@dataclasses.dataclass(frozen=True)
class Options:
    """Knobs of one run (``recmesh chaos --help`` lists them)."""

    rate: float = 25.0
    click_share: float = 0.2
    ingest_rate: float = 100.0
    ingest_batch: int = 10
    fault_s: float = 20.0
    long_fault_s: float = 30.0
    pre_s: float = 5.0
    post_s: float = 5.0
    settle_max_s: float = 30.0
    warmup_s: float = 10.0
    only: tuple[str, ...] = ()
    doc: Path = PROJECT_ROOT / "docs" / "chaos.md"
    out_dir: Path = PROJECT_ROOT / "docs" / "chaos"
    artifacts: Path | None = None
    keep: bool = False
    seed: int = 0


def _sleep_until(wall: float) -> None:
    time.sleep(max(0.0, wall - time.time()))


class Tail:
    """The load generator's records so far, read incrementally from its output file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.requests: list[Request] = []

    def read(self) -> list[Request]:
        with contextlib.suppress(FileNotFoundError), self._path.open() as lines:
            lines.seek(self._offset)
            while line := lines.readline():
                if not line.endswith("\n"):
                    break
                self._offset += len(line.encode())
                self.requests.append(Request.parse(json.loads(line)))
        return self.requests


def perform(
    scenario: Scenario,
    control: Control,
    observer: Any,
    tail: Tail,
    deadline_ms: float,
    opts: Options,
) -> Marks:
    """Run one scenario; returns when each of its phases began.

    After the repair the scenario goes on until it has recovered (as the report judges
    it, on what was seen so far) or ``settle_max_s`` passed, then ``post_s`` more.
    """
    start = time.time()
    time.sleep(opts.pre_s)
    fault = time.time()
    print(f"[{scenario.name}] {scenario.title}", flush=True)
    if scenario.action == "kill":
        control.signal(scenario.target, signal.SIGKILL)
        control.wait_exit(scenario.target, 10)
    elif scenario.action == "stop":
        control.signal(scenario.target, signal.SIGSTOP)
    elif scenario.action == "flag":
        control.set_flags(scenario.flags)
    elif scenario.action in ("redis", "term"):
        control.signal(scenario.target, signal.SIGTERM)
        exited = control.wait_exit(scenario.target, 60)
        print(f"  {scenario.target} exited {exited - fault:.1f} s after SIGTERM", flush=True)
    _sleep_until(fault + scenario.fault_s)
    recover = time.time()
    if scenario.action in ("kill", "redis", "term"):
        control.restart(scenario.target)
    elif scenario.action == "stop":
        control.signal(scenario.target, signal.SIGCONT)
    else:
        control.set_flags({})
    recovered = time.time()
    print(f"  repaired in {recovered - recover:.1f} s", flush=True)
    settled: float | None = None
    while settled is None and time.time() < recovered + opts.settle_max_s:
        time.sleep(0.5)
        # The load generator writes once a second: judge only complete seconds.
        marks = Marks(start, fault, recover, recovered, time.time() - 1.5)
        settled = recovered_after(
            scenario,
            marks,
            tail.read(),
            observer.samples,
            observer.health,
            deadline_ms,
            observer.group,
        )
    if settled is None:
        print(f"  not recovered {opts.settle_max_s:g} s after the repair", flush=True)
    else:
        print(f"  recovered {settled:.0f} s after the repair began", flush=True)
    time.sleep(opts.post_s)
    return Marks(start, fault, recover, recovered, time.time())


def _wait_outbox_drained(observer: Any, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        sample, _ = observer.latest()
        if sample is not None and sample.outbox == 0.0 and time.time() - sample.t < 1.5:
            return
        time.sleep(0.5)
    print(f"  outbox not empty {timeout_s:g} s after the load stopped", flush=True)


def _dump(path: Path, rows: list[Any]) -> None:
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(dataclasses.asdict(row)) + "\n")


CATCH_UP_S = 120.0
"""Longest wait, once the load stopped, for the projector to read and acknowledge the
whole log (a killed consumer's entries are claimed after ``RECMESH_PROJECTOR_CLAIM_IDLE_S``,
30 s by default)."""


def execute(opts: Options, scenarios: list[Scenario], base: Path) -> None:
    """Start the mesh, run ``scenarios`` under load and save every observation in ``base``."""
    from chaos.observe import Observer, check_projections, read_events
    from gateway.settings import GatewaySettings
    from mesh.settings import load
    from ops import supervisor
    from services.projector.settings import ProjectorSettings

    started = datetime.now(UTC).isoformat(timespec="seconds")
    t_begin = time.monotonic()
    # The repository's set when it is usable, else a small one trained for this run.
    artifact_set = find_or_train(
        opts.artifacts or ARTIFACTS_DIR,
        base / "artifacts",
        n_users=2000,
        n_items=10000,
        epochs=2,
        evaluate=False,
        progress=False,
    )
    artifacts, n_users = artifact_set.path.parent, int(artifact_set.config["n_users"])
    n_items = int(artifact_set.config["n_items"])
    api_key = "chaos-" + secrets.token_hex(12)
    tenants = write_tenants(base / "tenants.json", {TENANT: api_key}, rate=1000, burst=2000)
    layout = mesh_layout(base, artifacts, tenants)
    projector = load(ProjectorSettings, layout.env())
    control = Control(layout)
    observer = Observer(layout, TENANT, projector.group)
    check: ProjectorCheck | None = None
    marks: dict[str, Marks] = {}
    print(f"chaos run in {base}; starting the mesh ...", flush=True)
    try:
        t_up = time.monotonic()
        supervisor.up(layout, timeout_s=120)
        startup_s = time.monotonic() - t_up
        print(f"mesh SERVING after {startup_s:.1f} s", flush=True)
        observer.start()
        url = f"http://127.0.0.1:{layout.http_port}"
        deadline_ms = load(GatewaySettings, layout.env()).deadline_s * 1000.0
        tail = Tail(base / "requests.jsonl")
        with (
            canary(base) as canary_pid,
            load_generator(
                url,
                api_key,
                base,
                rate=opts.rate,
                click_share=opts.click_share,
                n_users=n_users,
                seed=opts.seed,
            ) as load_pid,
            (
                ingest(
                    url,
                    api_key,
                    base,
                    rate=opts.ingest_rate,
                    batch=opts.ingest_batch,
                    click_share=opts.click_share,
                    n_users=n_users,
                    n_items=n_items,
                    seed=opts.seed,
                )
                if opts.ingest_rate > 0
                else contextlib.nullcontext(None)
            ) as ingest_pid,
        ):
            observer.extra_pids += [canary_pid, load_pid]
            if ingest_pid is not None:
                observer.extra_pids.append(ingest_pid)
            time.sleep(opts.warmup_s)
            for scenario in scenarios:
                marks[scenario.name] = perform(scenario, control, observer, tail, deadline_ms, opts)
        _wait_outbox_drained(observer)
        clicks: collections.Counter[str] = collections.Counter()
        impressions: collections.Counter[str] = collections.Counter()
        for event in read_events(layout.ports["events"], TENANT, layout.transport()):
            (clicks if event.type == "click" else impressions)[event.event_id] += 1
        print("waiting for the projector to catch up, then checking its projections ...")
        check = check_projections(layout.effective_redis_url(), TENANT, projector, CATCH_UP_S)
        print(
            f"  caught up: {check.caught_up} after {check.waited_s:.1f} s; "
            f"{check.difference_count} differences over {check.entries} log entries",
            flush=True,
        )
    finally:
        control.resume_all()
        observer.stop()
        supervisor.down(layout)
    _dump(base / "samples.jsonl", observer.samples)
    _dump(base / "health.jsonl", observer.health)
    _dump(base / "group.jsonl", observer.group)
    (base / "projector.json").write_text(
        json.dumps(dataclasses.asdict(check) if check is not None else None)
    )
    (base / "stored.json").write_text(json.dumps({"clicks": clicks, "impressions": impressions}))
    run = {
        "started": started,
        "deadline_ms": deadline_ms,
        "total_s": time.monotonic() - t_begin,
        "startup_s": startup_s,
        "host": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "cpus": os.cpu_count(),
        "rate": opts.rate,
        "users": max(1, round(opts.rate / PER_USER_RATE)),
        "click_share": opts.click_share,
        "ingest": {"rate": opts.ingest_rate, "batch": opts.ingest_batch},
        "artifacts": _display(artifacts),
        "durations_s": {
            "pre": opts.pre_s,
            "fault": opts.fault_s,
            "long_fault": opts.long_fault_s,
            "post": opts.post_s,
        },
        "scenarios": [s.name for s in scenarios],
        "marks": {name: dataclasses.asdict(m) for name, m in marks.items()},
    }
    (base / "run.json").write_text(json.dumps(run, indent=2))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return "trained for this run"


def analyse(base: Path, opts: Options) -> bool:
    """Build the reports from the observations saved in ``base``; True when all bars hold."""
    from chaos.plot import timeline_png

    run = json.loads((base / "run.json").read_text())
    deadline_ms = float(run["deadline_ms"])
    requests = [Request.parse(json.loads(line)) for line in _lines(base / "requests.jsonl")]
    samples = [Sample(**json.loads(line)) for line in _lines(base / "samples.jsonl")]
    health = [HealthSample(**json.loads(line)) for line in _lines(base / "health.jsonl")]
    stored = json.loads((base / "stored.json").read_text())
    clicks: dict[str, int] = stored["clicks"]
    every_id = collections.Counter(clicks) + collections.Counter(stored["impressions"])
    # Runs from before the ingest and the projector check lack their files.
    posts = [Post.parse(json.loads(line)) for line in _lines(base / "ingest.jsonl", True)]
    group = [GroupSample(**json.loads(line)) for line in _lines(base / "group.jsonl", True)]
    checked = (
        json.loads((base / "projector.json").read_text())
        if (base / "projector.json").exists()
        else None
    )
    check = ProjectorCheck(**checked) if checked else None
    evidence = Evidence(posts, every_id, group, check)
    stalls: dict[int, float] = {}
    for line in _lines(base / "canary.jsonl"):
        record = json.loads(line)
        stalls[int(record["t"])] = float(record["max_ms"])
    scenarios = {
        s.name: s
        for s in default_scenarios(run["durations_s"]["fault"], run["durations_s"]["long_fault"])
    }
    reports = [
        build(
            scenarios[name],
            Marks(**marks),
            requests,
            samples,
            health,
            clicks,
            deadline_ms,
            stalls,
            evidence,
        )
        for name, marks in run["marks"].items()
    ]
    accepted = {r.event_id for r in requests if r.kind == "evt" and r.ok}
    expected = set(impression_ids(requests))
    ingested = {i for p in posts if p.ok for i in p.ids}
    loads = [s.load1 for s in samples]
    run |= {
        "stall_seconds": sum(v >= STALL_MS for v in stalls.values()),
        "other_cpu_pct": other_cpu(samples, samples[0].t, samples[-1].t) if samples else None,
        "host_busy_pct": (
            other_cpu(samples, samples[0].t, samples[-1].t, everyone=True) if samples else None
        ),
        "load1_mean": sum(loads) / len(loads) if loads else None,
        "load1_max": max(loads, default=None),
        "events": {
            "clicks_accepted": len(accepted),
            "clicks_stored": sum(1 for i in accepted if clicks.get(i, 0) > 0),
            "clicks_lost": sum(1 for i in accepted if clicks.get(i, 0) == 0),
            "duplicates": sum(n - 1 for n in clicks.values() if n > 1)
            + sum(n - 1 for n in stored["impressions"].values() if n > 1),
            "impressions_expected": len(expected),
            "impressions_stored": sum(1 for i in expected if stored["impressions"].get(i, 0)),
            "ingest_posts": len(posts),
            "ingest_posts_accepted": sum(p.ok for p in posts),
            "ingest_accepted": len(ingested),
            "ingest_stored": sum(1 for i in ingested if every_id.get(i, 0)),
        },
        "projector_check": dataclasses.asdict(check) if check is not None else None,
        "findings": findings(reports),
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for report in reports:
        png = timeline_png(report, deadline_ms, opts.out_dir / f"{report.scenario.name}.png")
        images[report.scenario.name] = os.path.relpath(png, opts.doc.parent)
    document = to_json(reports, run)
    (opts.out_dir / "report.json").write_text(json.dumps(document, indent=1) + "\n")
    opts.doc.write_text(to_markdown(reports, run, images))
    for report in reports:
        missed = [b.name for b in report.bars if b.passed is False]
        state = "ok" if not missed else "MISSED " + ", ".join(missed)
        print(f"  {report.scenario.name:<26} {state}")
    print(f"report: {opts.doc} and {opts.out_dir / 'report.json'}")
    return bool(document["passed"])


def _lines(path: Path, optional: bool = False) -> Iterator[str]:
    """The non-empty lines of ``path`` (none when ``optional`` and it does not exist)."""
    if optional and not path.exists():
        return
    with path.open() as lines:
        for line in lines:
            if line.strip():
                yield line


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(prog="recmesh chaos", description=__doc__)
    defaults = Options()
    parser.add_argument("--rate", type=float, default=defaults.rate, help="requests/s")
    parser.add_argument(
        "--ingest-rate",
        type=float,
        default=defaults.ingest_rate,
        help="events/s posted to /v1/events besides the load's clicks (0: none)",
    )
    parser.add_argument("--fault-s", type=float, default=defaults.fault_s)
    parser.add_argument("--long-fault-s", type=float, default=defaults.long_fault_s)
    parser.add_argument("--post-s", type=float, default=defaults.post_s)
    parser.add_argument("--only", nargs="*", default=[], help="scenario names (default: all)")
    parser.add_argument("--doc", type=Path, default=defaults.doc, help="Markdown report")
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="JSON and PNGs")
    parser.add_argument("--artifacts", type=Path, default=None, help="artifact root")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reanalyse", type=Path, default=None, help="run directory to report")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    scenarios = default_scenarios(args.fault_s, args.long_fault_s)
    if args.list:
        for s in scenarios:
            print(f"{s.name:<26} {s.title}")
        raise SystemExit(0)
    try:
        select(scenarios, args.only)
    except ValueError as exc:
        parser.error(str(exc))
    opts = Options(
        rate=args.rate,
        ingest_rate=args.ingest_rate,
        fault_s=args.fault_s,
        long_fault_s=args.long_fault_s,
        post_s=args.post_s,
        only=tuple(args.only),
        doc=args.doc,
        out_dir=args.out_dir,
        artifacts=args.artifacts,
        keep=args.keep,
        seed=args.seed,
    )
    return opts, args.reanalyse


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``recmesh chaos`` and ``python -m chaos``; 1 when a bar was missed."""
    opts, reanalyse = parse_args(argv)
    if reanalyse is not None:
        return 0 if analyse(reanalyse, opts) else 1
    scenarios = select(default_scenarios(opts.fault_s, opts.long_fault_s), list(opts.only))
    base = Path(tempfile.mkdtemp(prefix="recmesh-chaos-"))
    execute(opts, scenarios, base)
    passed = analyse(base, opts)
    if passed and not opts.keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"observations kept in {base}")
    return 0 if passed else 1
