"""The step benchmark's figures: one summary per step from the load generator's records and
the CPU samples, the sustained rate, and the reports (JSON, Markdown tables,
``docs/benchmarks.md``, PNG). Pure functions but for the writers at the end
(:func:`plot`, :func:`write_reports`); :mod:`loadtest.steps` runs the benchmark.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.reporting import ms, percentile, run_section, table
from loadtest.traffic import PER_USER_RATE

P99_LIMIT_MS = 50.0
"""The latency objective a sustained step meets at the 99th percentile."""

MIN_ACHIEVED = 0.95
"""Share of the offered rate a sustained step must have sent."""


@dataclass(frozen=True)
class StepResult:
    """What one step of offered load measured within its window.

    Latencies are those of every recommendation sent in the window, failed ones
    included; ``errors`` counts failed recommendations and clicks; ``cpu`` is CPU seconds
    per second of each process of the target, ``load_cpu`` that of the load generator
    (``None`` where a process was not sampled).
    """

    offered_qps: float
    users: int
    window_s: float
    sent: int
    achieved_qps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    errors: int
    error_rate: float
    error_kinds: dict[str, int]
    degraded_share: float
    clicks: int
    clicks_accepted: int
    cpu: dict[str, float] = field(default_factory=dict)
    load_cpu: float | None = None
    degraded_stages: dict[str, float] = field(default_factory=dict)
    """Share of the answers that named each stage as fallen back (an answer may name
    several)."""

    @property
    def target_cpu(self) -> float:
        """CPU seconds per second of the whole target."""
        return sum(self.cpu.values())

    def meets(self, p99_limit_ms: float = P99_LIMIT_MS, min_achieved: float = MIN_ACHIEVED) -> bool:
        """p99 within the limit, no error, and at least ``min_achieved`` of the rate sent."""
        return (
            self.sent > 0
            and self.p99_ms is not None
            and self.p99_ms <= p99_limit_ms
            and self.errors == 0
            and self.achieved_qps >= min_achieved * self.offered_qps
        )


def _failed(record: Mapping[str, Any]) -> bool:
    return bool(record.get("e")) or not 200 <= int(record.get("s", 0)) < 300


def _error_name(record: Mapping[str, Any]) -> str:
    """The error kind, or the status for an error status (``503``, ``429``)."""
    kind = str(record.get("e") or "")
    return kind if kind and kind != "http" else str(record.get("s", 0))


def _percentile(values: np.ndarray[Any, Any], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 3)


def summarise_step(
    offered_qps: float,
    users: int,
    records: Iterable[Mapping[str, Any]],
    window: tuple[float, float],
    cpu: Mapping[str, float] | None = None,
    load_cpu: float | None = None,
) -> StepResult:
    """The figures of the requests that started within ``window`` (wall-clock seconds,
    start inclusive, end exclusive); records as :mod:`loadtest.traffic` writes them."""
    start, end = window
    inside = [r for r in records if start <= float(r["t"]) < end]
    recs = [r for r in inside if r["k"] == "rec"]
    clicks = [r for r in inside if r["k"] == "evt"]
    latencies = np.asarray([float(r["ms"]) for r in recs], dtype=np.float64)
    kinds = Counter(f"{r['k']}:{_error_name(r)}" for r in inside if _failed(r))
    errors = sum(kinds.values())
    answered = [r for r in recs if not _failed(r)]
    window_s = end - start
    return StepResult(
        offered_qps=offered_qps,
        users=users,
        window_s=window_s,
        sent=len(recs),
        achieved_qps=round(len(recs) / window_s, 3) if window_s > 0 else 0.0,
        p50_ms=_percentile(latencies, 50),
        p95_ms=_percentile(latencies, 95),
        p99_ms=_percentile(latencies, 99),
        max_ms=float(latencies.max()) if latencies.size else None,
        errors=errors,
        error_rate=errors / len(inside) if inside else 0.0,
        error_kinds=dict(kinds),
        degraded_share=(
            sum(1 for r in answered if r.get("d")) / len(answered) if answered else 0.0
        ),
        clicks=len(clicks),
        clicks_accepted=sum(1 for r in clicks if not _failed(r) and int(r["s"]) == 202),
        cpu={name: round(value, 4) for name, value in (cpu or {}).items()},
        load_cpu=None if load_cpu is None else round(load_cpu, 4),
        degraded_stages={
            stage: round(count / len(answered), 4)
            for stage, count in Counter(s for r in answered for s in r.get("d") or ()).most_common()
        },
    )


def _degraded(step: StepResult) -> str:
    """The degraded share and, when there is one, the stages that fell back most."""
    text = f"{100 * step.degraded_share:.1f} %"
    if step.degraded_stages:
        stages = ", ".join(
            f"{stage} {100 * share:.1f}" for stage, share in list(step.degraded_stages.items())[:3]
        )
        text += f" ({stages})"
    return text


def one_line(step: StepResult) -> str:
    """A step's main figures on one line (progress output)."""
    return (
        f"{step.offered_qps:g} QPS: achieved {step.achieved_qps:.1f}, p50 {_ms1(step.p50_ms)} "
        f"p99 {_ms1(step.p99_ms)} ms, errors {step.errors}, degraded {_degraded(step)}, "
        f"target CPU {step.target_cpu:.2f} s/s"
    )


def step_window(
    records: Sequence[Mapping[str, Any]], users: int, step_s: float, longest_s: float
) -> tuple[float, float]:
    """The measured window of a step: from the first recommendation of the last of its
    ``users`` to start (records carry the user's number ``u``) for ``step_s`` seconds.

    Raises:
        ValueError: fewer than ``users`` users sent a recommendation, or no request ended
            ``longest_s`` after the window (so requests sent in it may be missing).
    """
    first: dict[int, float] = {}
    for record in records:
        if record["k"] == "rec":
            user, started = int(record["u"]), float(record["t"])
            first[user] = min(first.get(user, started), started)
    if len(first) < users:
        raise ValueError(f"{len(first)} of {users} users sent a recommendation")
    start = max(first.values())
    last_end = max(float(r["t"]) + float(r["ms"]) / 1000.0 for r in records)
    if last_end < start + step_s + longest_s:
        raise ValueError(
            f"the load stopped {start + step_s + longest_s - last_end:.1f} s too early"
        )
    return start, start + step_s


def sustained(
    steps: Sequence[StepResult],
    p99_limit_ms: float = P99_LIMIT_MS,
    min_achieved: float = MIN_ACHIEVED,
) -> float | None:
    """The highest offered rate among the steps that meet the objective (None: none does)."""
    rates = [s.offered_qps for s in steps if s.meets(p99_limit_ms, min_achieved)]
    return max(rates) if rates else None


def cpu_rates(
    samples: Sequence[tuple[float, Mapping[str, float]]], window: tuple[float, float]
) -> dict[str, float]:
    """CPU seconds per second of each process over ``window``, from cumulative samples
    ``(wall time, {name: cpu seconds})``: between the first sample at or after the
    window's start and the last one at or before its end. A process missing from either
    sample (it was not running) is left out."""
    inside = [s for s in samples if window[0] <= s[0] <= window[1]]
    if len(inside) < 2:
        return {}
    (t0, first), (t1, last) = inside[0], inside[-1]
    return {name: (last[name] - first[name]) / (t1 - t0) for name in last if name in first}


@dataclass
class TargetRun:
    """One target's steps and circumstances."""

    name: str
    startup_s: float
    load_before: tuple[float, float, float]
    steps: list[StepResult]

    def sustained(self) -> float | None:
        return sustained(self.steps)


def ratio(runs: Mapping[str, TargetRun]) -> float | None:
    """Sustained rate of the monolith over the mesh's (None unless both sustained one)."""
    if "mesh" not in runs or "monolith" not in runs:
        return None
    mesh, monolith = runs["mesh"].sustained(), runs["monolith"].sustained()
    return monolith / mesh if mesh and monolith else None


def to_json(runs: Mapping[str, TargetRun], run: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document of a run (``None`` for figures that could not be measured)."""
    return {
        "run": dict(run),
        "objective": {"p99_ms": P99_LIMIT_MS, "errors": 0, "min_achieved": MIN_ACHIEVED},
        "targets": {
            name: {
                "startup_s": round(target.startup_s, 2),
                "load_before": [round(value, 2) for value in target.load_before],
                "sustained_qps": target.sustained(),
                "steps": [asdict(step) | {"meets": step.meets()} for step in target.steps],
            }
            for name, target in runs.items()
        },
        "monolith_over_mesh": ratio(runs),
    }


def _ms1(value: float | None) -> str:
    return ms(value, 1)


def _qps(value: float | None) -> str:
    return "none" if value is None else f"{value:g} QPS"


def headline(runs: Mapping[str, TargetRun]) -> str:
    """``mesh/monolith throughput at p99 ≤ 50 ms`` as one sentence."""
    parts = [f"{name} {_qps(target.sustained())}" for name, target in runs.items()]
    text = f"Throughput at p99 ≤ {P99_LIMIT_MS:g} ms: " + ", ".join(parts)
    value = ratio(runs)
    if value is not None:
        text += f"; monolith/mesh {value:.2f}x"
    return text + "."


def tables(runs: Mapping[str, TargetRun]) -> list[str]:
    """Markdown: per target, a latency table and a CPU table (one row per step)."""
    lines: list[str] = []
    for name, target in runs.items():
        header = (
            "offered QPS",
            "achieved QPS",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "errors",
            "degraded",
            "clicks 202",
            "target CPU s/s",
            "locust CPU s/s",
            "meets",
        )
        rows = [
            (
                f"{s.offered_qps:g}",
                f"{s.achieved_qps:.1f}",
                _ms1(s.p50_ms),
                _ms1(s.p95_ms),
                _ms1(s.p99_ms),
                _ms1(s.max_ms),
                f"{s.errors} ({100 * s.error_rate:.1f} %)" if s.errors else "0",
                _degraded(s),
                f"{s.clicks_accepted}/{s.clicks}",
                f"{s.target_cpu:.2f}",
                _cpu(s.load_cpu),
                "yes" if s.meets() else "no",
            )
            for s in target.steps
        ]
        lines += [f"### {name}", "", *table(header, "rrrrrrrrrrrc", rows)]
        names = sorted({n for s in target.steps for n in s.cpu}, key=_process_order)
        if names:
            cpu_rows = [
                (f"{s.offered_qps:g}", *(_cpu(s.cpu.get(n)) for n in names), _cpu(s.load_cpu))
                for s in target.steps
            ]
            per_rec_rows = [
                (
                    f"{s.offered_qps:g}",
                    *(_per_rec(s.cpu.get(n), s.achieved_qps) for n in names),
                    _per_rec(s.target_cpu, s.achieved_qps),
                )
                for s in target.steps
            ]
            lines += [
                "",
                f"CPU seconds per second of each {name} process:",
                "",
                *table(("offered QPS", *names, "locust"), "r" * (len(names) + 2), cpu_rows),
                "",
                f"CPU milliseconds per recommendation sent, by {name} process (degraded answers "
                "cost less: read with the degraded share):",
                "",
                *table(("offered QPS", *names, "total"), "r" * (len(names) + 2), per_rec_rows),
            ]
        lines.append("")
    return lines


def _per_rec(cpu: float | None, rate: float) -> str:
    """CPU milliseconds per recommendation from CPU seconds per second at ``rate``."""
    return "—" if cpu is None or rate <= 0 else f"{1000 * cpu / rate:.1f}"


def _cpu(value: float | None) -> str:
    """A CPU seconds-per-second cell (``—``: the process was not sampled)."""
    return "—" if value is None else f"{value:.2f}"


PROCESS_ORDER = (
    "gateway",
    "monolith",
    "retrieval",
    "ranking",
    "feature",
    "experiment",
    "events",
    "quota",
    "redis",
)
"""Column order of the CPU table (others follow by name)."""


def _process_order(name: str) -> tuple[int, str]:
    order = PROCESS_ORDER
    return (order.index(name) if name in order else len(order), name)


def plot(runs: Mapping[str, TargetRun], path: Path) -> Path:
    """p50 and p99 latency against offered load, one colour per target (PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    colours = {"mesh": "tab:blue", "monolith": "tab:orange"}
    for name, target in runs.items():
        rates = [s.offered_qps for s in target.steps]
        colour = colours.get(name, "tab:gray")
        p99 = [math.nan if s.p99_ms is None else s.p99_ms for s in target.steps]
        p50 = [math.nan if s.p50_ms is None else s.p50_ms for s in target.steps]
        axes.plot(rates, p99, "o-", color=colour, label=f"{name} p99")
        axes.plot(rates, p50, "s--", color=colour, alpha=0.7, label=f"{name} p50")
    axes.axhline(
        P99_LIMIT_MS,
        color="tab:red",
        linewidth=0.8,
        linestyle=":",
        label=f"p99 objective {P99_LIMIT_MS:g} ms",
    )
    axes.set_xlabel("offered load (recommendations/s)")
    axes.set_ylabel("latency (ms, log scale)")
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axes.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    axes.set_title("POST /v1/recommend latency against offered load")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def document(
    runs: Mapping[str, TargetRun], run: Mapping[str, Any], box: Mapping[str, str], image: str
) -> str:
    """``docs/benchmarks.md``: the step benchmark's run, machine, headline and tables."""
    load = run["load_before"]
    lines = [
        "# Benchmarks",
        "",
        "Throughput of the recommendation API in steps of offered load, the mesh (one process",
        "per service, gRPC between them) against the monolith (the same funnel in one process),",
        "written by `python -m loadtest.steps` (`make bench`, `recmesh bench`; see its",
        "docstring). The per-stage latency benchmark is in [bench/stages.md](bench/stages.md)",
        "(`python -m loadtest.bench`).",
        "",
        f"**{headline(runs)}**",
        "",
        f"A target sustains a rate when that step's p99 is at most "
        f"{P99_LIMIT_MS:g} ms, no request failed",
        f"and at least {100 * MIN_ACHIEVED:g} % of the offered rate was sent; "
        "the figure is the highest such step.",
        "",
        *run_section(
            str(run["command"]),
            str(run["started"]),
            box,
            f"load average before the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
            "(1 / 5 / 15 min); before each target: "
            + ", ".join(f"{name} {target.load_before[0]:.2f}" for name, target in runs.items()),
            str(run["artifacts"]),
        ),
        f"- steps: {', '.join(f'{r:g}' for r in run['rates'])} recommendations/s, "
        f"{run['step_s']:g} s each after {run['warmup_s']:g} s of warm-up; start-up "
        + ", ".join(f"{name} {target.startup_s:.1f} s" for name, target in runs.items()),
        f"- traffic: {run['traffic']}",
        f"- tracing: {run['tracing']}",
        "",
        "## Results",
        "",
        f"![p50 and p99 latency against offered load]({image})",
        "",
        *tables(runs),
        "## Reading the figures",
        "",
        "- Latency is measured by the load generator from sending the request to reading the",
        "  whole answer, for every recommendation sent in the step's window, failed ones",
        "  included; percentiles are exact over those requests (no histogram buckets).",
        "- The load is open: users fire on a fixed grid whatever the target does, and one",
        "  that fell behind catches up at once, so a slow target shows up as latency and",
        "  errors. The achieved rate falls below the offered one when the load generator",
        "  itself falls behind (see its CPU), or when answers are so slow that a user's visit",
        "  (recommendation, think time, click) keeps taking longer than its "
        f"{1 / PER_USER_RATE:g} s period.",
        "- `degraded` is the share of answers that named a stage that fell back; such answers",
        "  count as successes. `clicks 202` is accepted clicks over clicks posted.",
        "- CPU is user + system seconds per second of wall time over the window (1.00 = one",
        "  core busy), per process by pid; `locust` is the load generator. Every process,",
        "  the load generator included, shares the machine above: compare runs made at",
        "  similar load averages.",
        "",
    ]
    return "\n".join(lines)


def write_reports(
    runs: Mapping[str, TargetRun],
    run: Mapping[str, Any],
    box: Mapping[str, str],
    out_dir: Path,
    doc: Path,
) -> list[Path]:
    """Write the run's reports: ``doc`` (:func:`document`) and, in ``out_dir``,
    ``steps.json`` (:func:`to_json`), ``steps.md`` (headline and :func:`tables`) and
    ``steps.png`` (:func:`plot`); returns their paths in that order. ``run`` holds the
    run's circumstances (``command``, ``started``, ``load_before``, ``artifacts``,
    ``rates``, ``step_s``, ``warmup_s``, ``traffic``, ``tracing``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = out_dir / "steps.json"
    figures.write_text(json.dumps(to_json(runs, run), indent=1) + "\n")
    markdown = out_dir / "steps.md"
    heading = [f"# Step benchmark: `{run['command']}`", "", headline(runs), ""]
    markdown.write_text("\n".join(heading + tables(runs)))
    png = plot(runs, out_dir / "steps.png")
    doc.write_text(document(runs, run, box, os.path.relpath(png, doc.parent)))
    return [doc, figures, markdown, png]
