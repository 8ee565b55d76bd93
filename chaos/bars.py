"""The bars of each scenario, judged on its figures (see :mod:`chaos.scenarios` for which
bars a scenario has). Pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chaos.figures import Evidence, Figures, Marks, compute
from chaos.scenarios import BAR_TEXT, ISSUE_13_BARS, ISSUE_BARS, Scenario
from chaos.timeline import HealthSample, Request, Sample, Second

ANSWERED_BAR_PCT = 99.9
AMPLIFICATION_BAR = 1.2


@dataclass(frozen=True)
class Bar:
    """One bar of one scenario; ``passed`` is None when the figure could not be measured."""

    name: str
    text: str
    measured: float | bool | None
    passed: bool | None
    source: str


@dataclass
class ScenarioReport:
    scenario: Scenario
    marks: Marks
    figures: Figures
    bars: list[Bar]
    timeline: list[Second]

    @property
    def passed(self) -> bool:
        return all(bar.passed is not False for bar in self.bars)


def evaluate(
    scenario: Scenario, f: Figures, deadline_ms: float, check_made: bool = False
) -> list[Bar]:
    """The bars of ``scenario`` judged on ``f``; ``check_made`` says whether the run checked
    the projections at its end (without it the ``verify`` bar is not measured)."""
    bars = []
    for name in scenario.all_bars:
        measured: float | bool | None
        if name == "answered":
            measured = f.answered_pct
            passed = None if measured is None else measured >= ANSWERED_BAR_PCT
        elif name == "lost":
            measured = f.events_lost
            passed = None if measured is None else measured == 0
        elif name == "amplification":
            measured = f.max_amplification
            passed = None if measured is None else measured <= AMPLIFICATION_BAR
        elif name == "drain":
            measured = f.drain_errors
            passed = None if measured is None else measured == 0
        elif name == "p99":
            measured = f.p99_ms
            passed = None if measured is None else measured <= deadline_ms
        elif name == "opens":
            measured = f.breaker_opened
            passed = bool(measured)
        elif name == "closes":
            measured = f.breaker_closed_s is not None
            passed = measured
        elif name == "once":
            if f.events_missing is None or f.events_duplicated is None:
                measured, passed = None, None
            else:
                measured = f.events_missing + f.events_duplicated
                passed = measured == 0
        elif name == "verify":
            # No verdict (the projector never caught up) fails the bar: a projector that
            # cannot catch up is no better than one that counts wrong.
            measured = f.projections_differ
            passed = None if not check_made else measured == 0
        else:
            raise ValueError(f"unknown bar {name!r}")
        source = (
            "issue 5"
            if name in ISSUE_BARS
            else "issue 13"
            if name in ISSUE_13_BARS
            else "reliability.md"
        )
        bars.append(Bar(name, BAR_TEXT[name], measured, passed, source))
    return bars


def build(
    scenario: Scenario,
    marks: Marks,
    requests: Sequence[Request],
    samples: Sequence[Sample],
    health: Sequence[HealthSample],
    stored: Mapping[str, int] | None,
    deadline_ms: float,
    stalls: Mapping[int, float] | None = None,
    evidence: Evidence | None = None,
) -> ScenarioReport:
    """Figures, bars and timeline of one scenario (``evidence``: see
    :func:`chaos.figures.compute`)."""
    figures, timeline = compute(
        scenario, marks, requests, samples, health, stored, deadline_ms, stalls, evidence
    )
    check_made = evidence is not None and evidence.check is not None
    return ScenarioReport(
        scenario, marks, figures, evaluate(scenario, figures, deadline_ms, check_made), timeline
    )
