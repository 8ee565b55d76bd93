"""The feedback-loop simulation on a small trained set: exploration spreads impressions."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.artifacts import load_artifact_set, resolve_current
from loadtest.feedback_loop import SETTINGS, Funnel, run
from training.pipeline import world_of


@pytest.fixture(scope="module")
def funnel(artifacts_root: Path) -> Funnel:
    artifact_set = load_artifact_set(resolve_current(artifacts_root))
    return Funnel(artifact_set, world_of(artifact_set)[0])


def test_exploration_widens_coverage_and_lowers_the_concentration_of_impressions(
    funnel: Funnel,
) -> None:
    closed = run(funnel, SETTINGS["explore-0"], periods=3, steps=3, slate=10, seed=4, users=300)
    explored = run(funnel, SETTINGS["explore-0.2"], periods=3, steps=3, slate=10, seed=4, users=300)
    for before, after in zip(closed, explored, strict=True):
        assert after.coverage > before.coverage
        assert after.gini < before.gini
        assert after.cumulative_coverage > before.cumulative_coverage
        # 2 of 10 slots explore (floor(10 * 0.2 + 1/2)); none without exploration.
        assert after.explored_share == pytest.approx(0.2)
        assert before.explored_share == 0.0
    for periods in (closed, explored):
        ever = [p.cumulative_coverage for p in periods]
        assert ever == sorted(ever) and ever[0] < ever[-1]
        assert all(0.0 < p.gini < 1.0 and 0.0 < p.coverage <= 1.0 for p in periods)


def test_without_the_loop_no_impression_comes_from_trending(funnel: Funnel) -> None:
    periods = run(funnel, SETTINGS["no-loop"], periods=2, steps=2, slate=10, seed=1, users=100)
    assert all(p.trending_share == 0.0 for p in periods)
    looped = run(funnel, SETTINGS["explore-0"], periods=2, steps=2, slate=10, seed=1, users=100)
    # Clicks of the first batch make items trending for the next ones.
    assert looped[-1].trending_share > 0.0
