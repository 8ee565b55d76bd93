"""One PNG timeline per scenario: latency, error and degraded rates, breaker state, outbox
(and the projector's lag in the scenarios that check the projections)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from chaos.bars import ScenarioReport
from chaos.figures import REQUEST_PATH
from chaos.timeline import Second


def _values(timeline: Sequence[Second], name: str) -> list[float]:
    return [float("nan") if getattr(s, name) is None else float(getattr(s, name)) for s in timeline]


def timeline_png(report: ScenarioReport, deadline_ms: float, path: Path) -> Path:
    """Draw ``report``'s timeline into ``path`` (three panels sharing the time axis)."""
    timeline = report.timeline
    xs = [s.t for s in timeline]
    marks = report.marks
    repair, repaired = marks.recover - marks.fault, marks.recovered - marks.fault
    fig, (lat, rate, state) = plt.subplots(3, 1, figsize=(9, 7), sharex=True, dpi=80)
    fig.suptitle(f"{report.scenario.name}: {report.scenario.title}", fontsize=11)

    lat.plot(xs, _values(timeline, "p50_ms"), label="p50", color="tab:blue")
    lat.plot(xs, _values(timeline, "p99_ms"), label="p99", color="tab:orange")
    lat.plot(xs, _values(timeline, "max_ms"), label="max", color="tab:red", alpha=0.4)
    lat.plot(
        xs,
        _values(timeline, "stall_ms"),
        label="host stall",
        color="black",
        linestyle="--",
        linewidth=0.8,
    )
    lat.axhline(deadline_ms, color="black", linestyle=":", label=f"deadline {deadline_ms:g} ms")
    lat.set_ylabel("latency (ms)")
    lat.set_yscale("log")
    lat.legend(loc="upper right", fontsize=8, ncol=5)

    rate.plot(xs, _values(timeline, "error_pct"), label="failed", color="tab:red")
    rate.plot(xs, _values(timeline, "late_pct"), label="answered late", color="tab:purple")
    rate.plot(xs, _values(timeline, "degraded_pct"), label="degraded (any)", color="tab:gray")
    if report.scenario.stages:
        rate.plot(
            xs,
            _values(timeline, "stage_pct"),
            label="degraded: " + "/".join(report.scenario.stages),
            color="tab:green",
        )
    rate.plot(
        xs,
        _values(timeline, "other_cpu_pct"),
        label="host CPU taken by others",
        color="black",
        linestyle="--",
        linewidth=0.8,
    )
    rate.set_ylabel("%")
    rate.set_ylim(-3, 103)
    rate.legend(loc="upper right", fontsize=8, ncol=2)

    names = [report.scenario.downstream] if report.scenario.downstream else list(REQUEST_PATH)
    for name in names:
        ys = [s.breaker.get(name, float("nan")) for s in timeline]
        state.step(xs, ys, where="post", label=f"breaker {name}")
    state.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    state.set_ylim(-0.2, 2.2)
    state.set_xlabel("seconds since the fault was injected")
    outbox = state.twinx()
    outbox.plot(xs, _values(timeline, "outbox"), color="tab:brown", alpha=0.5, label="outbox")
    outbox.set_ylabel("outbox rows")
    if report.scenario.projects:
        outbox.plot(xs, _values(timeline, "lag"), color="tab:cyan", label="projector lag")
        outbox.plot(xs, _values(timeline, "pending"), color="tab:olive", label="pending")
        outbox.set_ylabel("outbox rows, log entries")
    lines, labels = state.get_legend_handles_labels()
    more, more_labels = outbox.get_legend_handles_labels()
    state.legend(lines + more, labels + more_labels, loc="upper right", fontsize=8, ncol=3)

    for axis in (lat, rate, state):
        axis.axvspan(0, repair, color="tab:red", alpha=0.08)
        axis.axvline(0, color="tab:red", linewidth=0.8)
        axis.axvline(repaired, color="tab:green", linewidth=0.8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
