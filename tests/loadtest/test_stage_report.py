"""The per-stage benchmark's figures and report from synthetic measurements (no mesh, no
timing): percentiles per stage and end to end, errors, degradations, the rendered tables."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.reporting import table
from loadtest.stage_report import Phase, Sample, stage_figures, summarise, to_markdown

BOX = {"cpu": "cpu", "memory": "1 GiB", "os": "os", "python": "3.12", "libraries": "x"}
RUN = {"started": "today", "startup_s": 4.0, "warmup_s": 2.0, "artifacts": "v1", "load": "2"}


def answered(e2e_ms: float, heavy_ms: float, scored: float, items: int = 10) -> Sample:
    """An answer whose ranking ran every stage, the heavy one taking ``heavy_ms``."""
    stages: list[dict[str, Any]] = [
        {"stage": "user_features", "elapsed_ms": 1.0},
        {"stage": "ann", "elapsed_ms": 2.0},
        {"stage": "user_features", "elapsed_ms": 0.5},
        {
            "stage": "item_features",
            "elapsed_ms": 1.0,
            "candidates_in": 100,
            "details": {"cache_hits": 25.0},
        },
        {"stage": "heavy", "elapsed_ms": heavy_ms, "details": {"scored": scored}},
    ]
    sample = stage_figures(stages, {"retrieval": 4.0, "ranking": heavy_ms + 2.0})
    sample.e2e_ms, sample.items = e2e_ms, items
    return sample


def test_a_phase_report_gives_each_stages_percentiles_in_funnel_order() -> None:
    # 200 answers: heavy takes 1..200 ms, end to end 2..400 ms; 4 answers fell short;
    # 10 requests failed, and the failures count in neither percentile.
    samples = [
        answered(2.0 * (i + 1), float(i + 1), scored=50.0 + i, items=8 if i < 4 else 10)
        for i in range(200)
    ]
    samples += [Sample(ok=False, status="DEADLINE_EXCEEDED", e2e_ms=900.0)] * 10
    samples[0].degraded = ["heavy"]
    summary = summarise(Phase("grpc-30ms", "grpc", 100, 2.1, 30), samples, 2.1)

    assert (summary.sent, summary.ok, summary.short_lists) == (210, 200, 4)
    assert summary.e2e == pytest.approx((201.0, 396.02, 400.0))
    assert summary.stages["ranking.heavy"] == pytest.approx((100.5, 198.01, 200))
    assert summary.heavy_scored == pytest.approx((149.5, 51.99))
    assert summary.cache_hit_rate == pytest.approx(0.25)

    report = to_markdown(
        [summary], RUN, "python -m loadtest.bench --rate 100", BOX | {"commit": "c"}
    )
    assert "## Phase `grpc-30ms`: GRPC, 100 requests/s for 2.1 s, deadline 30 ms" in report
    assert "- requests: 210 sent (100.0/s achieved), 200 answered 200/OK; errors: " in report
    assert "DEADLINE_EXCEEDED 10" in report
    assert "- answers with fewer than 10 items: 4" in report
    assert "- end to end: p50 201.00 ms, p99 396.02 ms, max 400.00 ms" in report
    assert "- answers naming a degraded stage: `heavy` 0.5 %" in report
    assert "- ranking item feature cache hit rate: 25.0 %" in report
    assert "median 150, 1st percentile 52" in report
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        "stage",
        "gateway.retrieval",
        "retrieval.user_features",
        "retrieval.ann",
        "gateway.ranking",
        "ranking.user_features",
        "ranking.item_features",
        "ranking.heavy",
        "**end to end (client)**",
    ]
    assert "| ranking.heavy | 100.50 | 198.01 | 200 |" in rows
    assert "| **end to end (client)** | **201.00** | **396.02** | 200 |" in rows


def test_a_phase_without_answers_reports_dashes_not_numbers() -> None:
    failed = [Sample(ok=False, status="UNAVAILABLE", e2e_ms=1.0)] * 3
    summary = summarise(Phase("http", "http", 10, 1), failed, 1.0)
    assert summary.e2e == (None, None, None)
    assert summary.heavy_scored is None and summary.cache_hit_rate is None
    report = to_markdown([summary], RUN, "python -m loadtest.bench", BOX | {"commit": "c"})
    assert "deadline gateway default (100 ms)" in report
    assert "- end to end: p50 — ms, p99 — ms, max — ms" in report
    assert "| **end to end (client)** | **—** | **—** | 0 |" in report
    assert "- answers naming a degraded stage: none" in report


def test_a_table_aligns_each_column_and_rejects_a_wrong_alignment() -> None:
    assert table(("a", "b", "c"), "lrc", [(1, "x", None)]) == [
        "| a | b | c |",
        "|---|---:|:-:|",
        "| 1 | x | None |",
    ]
    with pytest.raises(ValueError, match="3 columns"):
        table(("a", "b", "c"), "lr", [])
