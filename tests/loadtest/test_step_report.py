"""The step benchmark's bookkeeping on synthetic records: windows, percentiles, errors,
CPU rates, the sustained rate and the reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest.step_report import (
    StepResult,
    TargetRun,
    cpu_rates,
    headline,
    plot,
    ratio,
    step_window,
    summarise_step,
    sustained,
    tables,
    to_json,
)


def rec(t: float, ms: float, status: int = 200, error: str = "", degraded: bool = False) -> Any:
    return {"k": "rec", "t": t, "ms": ms, "s": status, "e": error, "d": ["ranking"] * degraded}


def evt(t: float, status: int = 202, error: str = "") -> Any:
    return {"k": "evt", "t": t, "ms": 3.0, "s": status, "e": error, "id": f"e{t}"}


def test_percentiles_and_rate_come_from_the_window_only() -> None:
    inside = [rec(100.0 + i / 10, ms=float(i + 1)) for i in range(100)]  # 1..100 ms in 10 s
    outside = [rec(99.9, ms=5000.0), rec(110.0, ms=5000.0)]
    step = summarise_step(10.0, 20, outside + inside, (100.0, 110.0))
    assert (step.sent, step.achieved_qps, step.window_s) == (100, 10.0, 10.0)
    assert step.p50_ms == pytest.approx(50.5)
    assert step.p95_ms == pytest.approx(95.05)
    assert step.p99_ms == pytest.approx(99.01)
    assert step.max_ms == 100.0
    assert (step.errors, step.error_rate, step.error_kinds) == (0, 0.0, {})


def test_errors_count_failed_recommendations_and_clicks_and_keep_their_latency() -> None:
    records = [rec(0.1 * i, 10.0) for i in range(1, 96)]
    records += [rec(9.6, 2000.0, status=0, error="timeout"), rec(9.7, 20.0, status=503)]
    records += [rec(9.8, 10.0, degraded=True), rec(9.9, 10.0, status=429)]
    records += [evt(5.0), evt(5.1), evt(5.2, status=0, error="reset")]
    step = summarise_step(10.0, 20, records, (0.0, 10.0))
    assert step.sent == 99
    assert step.errors == 4
    assert step.error_rate == pytest.approx(4 / 102)
    assert step.error_kinds == {"rec:timeout": 1, "rec:503": 1, "rec:429": 1, "evt:reset": 1}
    assert step.max_ms == 2000.0, "a timed-out request counts at its time"
    assert step.degraded_share == pytest.approx(1 / 96)
    assert step.degraded_stages == {"ranking": round(1 / 96, 4)}
    assert (step.clicks, step.clicks_accepted) == (3, 2)
    assert not step.meets()


def test_an_empty_window_has_no_percentiles_and_does_not_meet() -> None:
    step = summarise_step(10.0, 20, [rec(1.0, 5.0)], (5.0, 10.0))
    assert (step.sent, step.p99_ms, step.max_ms) == (0, None, None)
    assert not step.meets()


def step(rate: float, p99: float | None, errors: int = 0, achieved: float | None = None) -> Any:
    return StepResult(
        offered_qps=rate,
        users=int(rate * 2),
        window_s=30.0,
        sent=int(rate * 30),
        achieved_qps=rate if achieved is None else achieved,
        p50_ms=None if p99 is None else p99 / 2,
        p95_ms=p99,
        p99_ms=p99,
        max_ms=p99,
        errors=errors,
        error_rate=0.0,
        error_kinds={},
        degraded_share=0.0,
        clicks=10,
        clicks_accepted=10,
        cpu={"gateway": 0.5, "redis": 0.1},
        load_cpu=0.2,
    )


def test_sustained_is_the_highest_step_meeting_latency_errors_and_rate() -> None:
    steps = [step(25, 20.0), step(50, 30.0), step(100, 49.9), step(150, 80.0)]
    assert sustained(steps) == 100
    assert sustained([step(25, 20.0), step(50, 20.0, errors=1)]) == 25
    assert sustained([step(25, 20.0), step(50, 20.0, achieved=47.0)]) == 25
    assert sustained([step(25, 20.0), step(50, 20.0, achieved=47.6)]) == 50
    assert sustained([step(25, 60.0)]) is None
    assert sustained([step(25, 60.0), step(50, 40.0)]) == 50, "a noisy low step does not hide"


def test_ratio_headline_and_reports() -> None:
    runs = {
        "mesh": TargetRun("mesh", 5.0, (1.0, 1.0, 1.0), [step(25, 20.0), step(50, 70.0)]),
        "monolith": TargetRun("monolith", 3.0, (1.0, 1.0, 1.0), [step(25, 10.0), step(50, 30.0)]),
    }
    assert ratio(runs) == 2.0
    assert headline(runs) == (
        "Throughput at p99 ≤ 50 ms: mesh 25 QPS, monolith 50 QPS; monolith/mesh 2.00x."
    )
    text = "\n".join(tables(runs))
    assert (
        "| 50 | 50.0 | 35.0 | 70.0 | 70.0 | 70.0 | 0 | 0.0 % | 10/10 | 0.60 | 0.20 | no |" in text
    )
    assert "| offered QPS | gateway | redis | locust |" in text
    # CPU per recommendation: 0.5 s/s of the gateway and 0.6 s/s in all at 50/s.
    assert "| 50 | 10.0 | 2.0 | 12.0 |" in text
    document = json.loads(json.dumps(to_json(runs, {"command": "x"})))
    assert document["targets"]["mesh"]["sustained_qps"] == 25
    assert document["targets"]["monolith"]["steps"][1]["meets"] is True
    assert document["monolith_over_mesh"] == 2.0
    assert ratio({"mesh": runs["mesh"]}) is None


def test_the_window_opens_when_the_last_user_started_and_needs_the_tail_covered() -> None:
    records = [dict(rec(10.0 + 0.5 * u + 2.0 * k, 20.0), u=u) for u in range(4) for k in range(10)]
    assert step_window(records, 4, step_s=10.0, longest_s=3.0) == (11.5, 21.5)
    with pytest.raises(ValueError, match="3 of 4 users"):
        step_window([r for r in records if r["u"] != 2], 4, step_s=10.0, longest_s=3.0)
    with pytest.raises(ValueError, match="too early"):
        step_window(records, 4, step_s=16.0, longest_s=3.0)


def test_cpu_rates_use_the_samples_inside_the_window() -> None:
    samples = [
        (9.0, {"gateway": 0.0, "locust": 0.0}),
        (10.0, {"gateway": 1.0, "locust": 0.5, "redis": 0.0}),
        (15.0, {"gateway": 3.5, "locust": 1.0, "redis": 0.5}),
        (20.0, {"gateway": 6.0, "locust": 1.5}),
        (21.0, {"gateway": 100.0, "locust": 100.0}),
    ]
    assert cpu_rates(samples, (10.0, 20.0)) == {"gateway": 0.5, "locust": 0.1}
    assert cpu_rates(samples, (10.0, 15.0))["redis"] == pytest.approx(0.1)
    assert cpu_rates(samples, (16.0, 19.0)) == {}


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    runs = {"mesh": TargetRun("mesh", 5.0, (1.0, 1.0, 1.0), [step(25, 20.0), step(50, None)])}
    path = plot(runs, tmp_path / "bench" / "steps.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
