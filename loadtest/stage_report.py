"""The per-stage benchmark's figures: what one request saw (:class:`Sample`, from the stage
reports of its answer), the figures of a phase (:func:`summarise`) and the Markdown report
(:func:`to_markdown`, ``docs/bench/stages.md``). Pure functions; :mod:`loadtest.bench`
runs the benchmark.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from loadtest.reporting import ms, percentile, run_section, table

RANKING_STAGES = ("item_features", "prerank", "heavy", "rerank")
"""Stages only ranking reports (``user_features`` both services report)."""

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
"""Row order of a phase's stage table (stages not listed follow by name)."""

NUM_ITEMS = 10
"""Items every request asks for; an answer with fewer is a short list."""


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
    """What one request saw: ``ok`` and the ``status`` (``OK``/``200``, or the error),
    the client-measured latency, the items returned, each stage's milliseconds as
    ``service.stage``, the stages the answer named degraded, the reasons of the stages
    that reported a degradation, and the heavy ranker's and the item feature cache's
    figures (see :func:`stage_figures`)."""

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
    The sample is ``ok`` with an end-to-end time of 0: the caller sets what the client saw.
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


@dataclasses.dataclass
class Summary:
    """The figures of one phase, over the answered (``ok``) samples unless said otherwise.

    ``e2e`` is (p50, p99, max) ms; ``stages`` maps each stage to (p50 ms, p99 ms, answers
    in which it ran); ``errors`` counts the statuses of the failed samples; ``reasons``
    counts ``"stage: kind"`` of degradation reasons; ``heavy_scored`` is the median and
    1st percentile of candidates the heavy ranker scored; ``cache_hit_rate`` is the item
    feature cache's hits over candidates considered. ``None`` where nothing was measured.
    """

    phase: Phase
    wall_s: float
    sent: int
    ok: int
    errors: Counter[str]
    e2e: tuple[float | None, float | None, float | None]
    stages: dict[str, tuple[float | None, float | None, int]]
    degraded: Counter[str]
    reasons: Counter[str]
    short_lists: int
    heavy_scored: tuple[float, float] | None
    cache_hit_rate: float | None


def summarise(phase: Phase, samples: list[Sample], wall_s: float) -> Summary:
    """Percentiles (p50, p99) per stage and end to end, errors and degradations."""
    ok = [s for s in samples if s.ok]
    names = sorted({k for s in ok for k in s.stage_ms})
    stages: dict[str, tuple[float | None, float | None, int]] = {}
    for name in names:
        values = [s.stage_ms[name] for s in ok if name in s.stage_ms]
        stages[name] = (percentile(values, 50), percentile(values, 99), len(values))
    e2e = [s.e2e_ms for s in ok]
    scored = [s.scored for s in ok if s.scored is not None]
    median, low = percentile(scored, 50), percentile(scored, 1)
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
        e2e=(percentile(e2e, 50), percentile(e2e, 99), max(e2e) if e2e else None),
        stages=stages,
        degraded=Counter(d for s in ok for d in s.degraded),
        reasons=reasons,
        short_lists=sum(1 for s in ok if s.items < NUM_ITEMS),
        heavy_scored=(median, low) if median is not None and low is not None else None,
        cache_hit_rate=sum(s.cache_hits for s in ok) / considered if considered else None,
    )


def _reason_kind(text: str) -> str:
    """The reason without its numbers, so reasons group ("heavy-scored N of M ...")."""
    for prefix in ("heavy-scored", "pre-ranked", "no time", "diversified", "item features"):
        if text.startswith(prefix):
            return prefix
    return text.split(";")[0][:40]


def one_line(summary: Summary) -> str:
    """A phase's main figures on one line (progress output)."""
    return (
        f"ok {summary.ok}/{summary.sent}, e2e p50 {ms(summary.e2e[0], 2)} ms "
        f"p99 {ms(summary.e2e[1], 2)} ms, degraded {dict(summary.degraded)}"
    )


def to_markdown(
    summaries: Sequence[Summary], run: Mapping[str, Any], command: str, box: Mapping[str, str]
) -> str:
    """The report: command, machine, set-up, then a table per phase.

    ``run`` holds ``started`` (ISO date), ``load`` (text), ``artifacts`` (text),
    ``startup_s`` and ``warmup_s``; ``box`` is :func:`loadtest.harness.machine`.
    """
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
        *run_section(
            command, run["started"], box, f"load average: {run['load']}", run["artifacts"]
        ),
        f"- mesh start-up: {run['startup_s']:.1f} s; warm-up per phase: {run['warmup_s']:.0f} s "
        "(not recorded)",
        "- load: open loop (request *i* is sent at *i*/rate whatever the earlier ones do), "
        f"users drawn uniformly, {NUM_ITEMS} items per request, `debug` on",
        "",
    ]
    for summary in summaries:
        lines += _phase_section(summary)
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


def _phase_section(summary: Summary) -> list[str]:
    """One phase's heading, bullets and stage table (ending with a blank line)."""
    phase = summary.phase
    deadline = f"{phase.deadline_ms:g} ms" if phase.deadline_ms else "gateway default (100 ms)"
    achieved = summary.sent / summary.wall_s if summary.wall_s else 0.0
    errors = ", ".join(f"{k} {v}" for k, v in summary.errors.most_common()) or "none"
    p50, p99, longest = summary.e2e
    lines = [
        f"## Phase `{phase.name}`: {phase.api.upper()}, {phase.rate:g} requests/s for "
        f"{phase.duration_s:g} s, deadline {deadline}",
        "",
        f"- requests: {summary.sent} sent ({achieved:.1f}/s achieved), {summary.ok} answered "
        f"200/OK; errors: {errors}",
        f"- answers with fewer than {NUM_ITEMS} items: {summary.short_lists}",
        f"- end to end: p50 {ms(p50, 2)} ms, p99 {ms(p99, 2)} ms, max {ms(longest, 2)} ms",
    ]
    if summary.cache_hit_rate is not None:
        lines.append(f"- ranking item feature cache hit rate: {100 * summary.cache_hit_rate:.1f} %")
    if summary.heavy_scored is not None:
        lines.append(
            f"- candidates the heavy ranker scored: median {summary.heavy_scored[0]:.0f}, "
            f"1st percentile {summary.heavy_scored[1]:.0f}"
        )
    degraded = (
        ", ".join(
            f"`{k}` {100 * v / max(1, summary.ok):.1f} %" for k, v in summary.degraded.most_common()
        )
        or "none"
    )
    lines.append(f"- answers naming a degraded stage: {degraded}")
    if summary.reasons:
        reasons = ", ".join(f"{k} ({v})" for k, v in summary.reasons.most_common(6))
        lines.append(f"- degradation reasons: {reasons}")
    names = [n for n in STAGE_ORDER if n in summary.stages]
    names += sorted(n for n in summary.stages if n not in STAGE_ORDER)
    rows: list[Sequence[object]] = [
        (
            name,
            ms(summary.stages[name][0], 2),
            ms(summary.stages[name][1], 2),
            summary.stages[name][2],
        )
        for name in names
    ]
    rows.append(("**end to end (client)**", f"**{ms(p50, 2)}**", f"**{ms(p99, 2)}**", summary.ok))
    lines += ["", *table(("stage", "p50 ms", "p99 ms", "requests"), "lrrr", rows), ""]
    return lines
