"""Stage budgets, cost per candidate, scoring within a budget, adaptive quality factor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from mesh.context import Budget
from mesh.testing import ManualClock
from services.ranking.budget import CostModel, StagePlanner, score_within
from services.ranking.quality import QualityFactor

BUDGETS = {"item_features": 0.010, "prerank": 0.005, "heavy": 0.025, "rerank": 0.005}


def test_without_a_deadline_each_stage_gets_its_configured_budget() -> None:
    planner = StagePlanner(BUDGETS, None, reply_margin_s=0.001, reserve_s=0.001)
    assert [planner.budget(s) for s in BUDGETS] == list(BUDGETS.values())


def test_a_long_deadline_caps_nothing() -> None:
    clock = ManualClock(100.0)
    planner = StagePlanner(BUDGETS, Budget(0.100, clock), reply_margin_s=0.001, reserve_s=0.001)
    assert planner.budget("heavy") == pytest.approx(0.025)


def test_a_tight_deadline_is_paid_by_the_skippable_heavy_stage_first() -> None:
    clock = ManualClock(100.0)
    planner = StagePlanner(BUDGETS, Budget(0.015, clock), reply_margin_s=0.001, reserve_s=0.001)
    # Item features keep back the margin and one reserve for each of pre-rank and re-rank
    # (the heavy stage can be skipped, so it gets no reserve).
    assert planner.budget("item_features") == pytest.approx(0.010)
    clock.advance(0.004)
    assert planner.budget("prerank") == pytest.approx(0.005)
    clock.advance(0.001)
    # 10 ms left: margin 1 ms and re-rank's reserve 1 ms come off.
    assert planner.budget("heavy") == pytest.approx(0.008)
    clock.advance(0.0085)
    assert planner.budget("rerank") == pytest.approx(0.0005)
    clock.advance(0.001)
    assert planner.budget("rerank") == 0.0


def test_the_cost_per_candidate_rises_fast_and_falls_slowly() -> None:
    cost = CostModel(rise=0.5, fall=0.1)
    assert cost.affordable(0.010, 1.0) is None
    cost.observe(100, 0.001)  # 10 us per candidate
    assert cost.per_candidate == pytest.approx(10e-6)
    cost.observe(100, 0.003)  # 30 us: halfway up at once
    assert cost.per_candidate == pytest.approx(20e-6)
    cost.observe(100, 0.001)  # back to 10 us: a tenth of the way down
    assert cost.per_candidate == pytest.approx(19e-6)
    assert cost.affordable(0.019, 1.0) == 1000
    assert cost.affordable(0.0, 1.0) == 0


def _model(
    clock: ManualClock, per_row_s: float
) -> tuple[list[tuple[int, int]], Callable[[int, int], npt.NDArray[np.float32]]]:
    calls: list[tuple[int, int]] = []

    def score(start: int, stop: int) -> npt.NDArray[np.float32]:
        calls.append((start, stop))
        clock.advance((stop - start) * per_row_s)
        return -np.arange(start, stop, dtype=np.float32)

    return calls, score


def test_scoring_stops_before_the_call_that_would_not_fit() -> None:
    clock = ManualClock(100.0)
    calls, score = _model(clock, per_row_s=0.0005)  # 200 rows would take 100 ms
    cost = CostModel()
    result = score_within(
        score,
        200,
        0.026,
        cost,
        chunk=256,
        probe=32,
        safety=0.9,
        clock=clock,
    )
    # Plan with 0.9 * 26 = 23.4 ms: probe 32 rows (16 ms), then 7.4 ms / 0.5 ms = 14 rows.
    assert calls == [(0, 32), (32, 46)]
    assert result.scores.tolist() == (-np.arange(46)).tolist()
    assert clock.now - 100.0 <= 0.026
    assert cost.per_candidate == pytest.approx(0.0005)


def test_a_known_cost_sizes_the_calls_after_the_probe() -> None:
    clock = ManualClock(100.0)
    calls, score = _model(clock, per_row_s=0.0001)
    cost = CostModel()
    cost.observe(10, 0.001)
    result = score_within(
        score,
        200,
        0.0102,
        cost,
        chunk=256,
        probe=32,
        safety=0.9,
        clock=clock,
    )
    # 0.9 * 10.2 ms at 0.1 ms per candidate: 91 candidates, the first 32 as a probe.
    assert calls == [(0, 32), (32, 91)]
    assert result.scores.size == 91


def test_the_probe_limits_the_overrun_of_a_model_that_became_slow() -> None:
    clock = ManualClock(100.0)
    calls, score = _model(clock, per_row_s=0.0005)
    cost = CostModel()
    cost.observe(100, 0.0001)  # the average still says 1 us per candidate
    result = score_within(score, 200, 0.026, cost, chunk=256, probe=32, safety=0.9, clock=clock)
    # The probe (16 ms) shows the real cost; the rest is planned with it: 7.4 ms / 0.5 ms.
    assert calls == [(0, 32), (32, 46)]
    assert result.scores.size == 46
    assert clock.now - 100.0 <= 0.026


def test_nothing_fits_in_no_budget() -> None:
    clock = ManualClock(100.0)
    calls, score = _model(clock, per_row_s=0.0001)
    result = score_within(
        score,
        200,
        0.0,
        CostModel(),
        chunk=256,
        probe=32,
        safety=0.9,
        clock=clock,
    )
    assert calls == [] and result.scores.size == 0


def test_everything_fits_in_chunks_when_the_budget_allows() -> None:
    clock = ManualClock(100.0)
    calls, score = _model(clock, per_row_s=0.00001)
    result = score_within(
        score,
        200,
        0.025,
        CostModel(),
        chunk=100,
        probe=32,
        safety=0.9,
        clock=clock,
    )
    assert calls == [(0, 32), (32, 132), (132, 200)]
    assert result.scores.size == 200


def test_the_quality_factor_falls_when_p95_is_over_target_and_recovers_under_it() -> None:
    quality = QualityFactor(0.020, minimum=0.5, step=0.1, window=10, every=5)
    for _ in range(5):
        quality.observe(0.030)
    assert quality.factor == pytest.approx(0.9)
    for _ in range(20):
        quality.observe(0.030)
    assert quality.factor == pytest.approx(0.5)  # bounded below
    assert quality.scale(200) == 100
    for _ in range(10):
        quality.observe(0.005)  # the window now holds only fast timings
    assert quality.factor == pytest.approx(0.6)
    for _ in range(100):
        quality.observe(0.005)
    assert quality.factor == pytest.approx(1.0)  # bounded above
    assert quality.scale(200) == 200


def test_a_stage_at_its_target_holds_its_factor() -> None:
    quality = QualityFactor(0.020, step=0.1, window=10, every=5)
    quality.factor = 0.7
    for _ in range(50):
        quality.observe(0.0195)  # under the target, inside the hysteresis band
    assert quality.factor == pytest.approx(0.7)


def test_scaled_counts_never_drop_below_the_floor() -> None:
    quality = QualityFactor(0.020, minimum=0.2)
    quality.factor = 0.2
    assert quality.scale(20, floor=10) == 10
    assert quality.scale(5, floor=10) == 5


def test_the_answer_must_leave_a_reply_margin_before_the_deadline() -> None:
    clock = ManualClock(100.0)
    planner = StagePlanner(BUDGETS, Budget(0.015, clock), reply_margin_s=0.002, reserve_s=0.001)
    assert planner.answer_within() == pytest.approx(0.013)
    clock.advance(0.014)
    assert planner.answer_within() == 0.0
    assert StagePlanner(BUDGETS, None, 0.002, 0.001).answer_within() is None
