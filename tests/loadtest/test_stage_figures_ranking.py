"""The benchmark's bookkeeping (no load, no timing): stage attribution, summary, report."""

from __future__ import annotations

from loadtest.stage_report import Phase, Sample, stage_figures, summarise, to_markdown

STAGES = [
    {"stage": "user_features", "elapsed_ms": 2.0},
    {"stage": "ann", "elapsed_ms": 1.0},
    {"stage": "merge", "elapsed_ms": 0.5},
    {"stage": "user_features", "elapsed_ms": 0.01},
    {
        "stage": "item_features",
        "elapsed_ms": 1.5,
        "details": {"cache_hits": 450.0},
        "candidates_in": 600,
    },
    {"stage": "prerank", "elapsed_ms": 0.3},
    {
        "stage": "heavy",
        "elapsed_ms": 9.0,
        "degraded": True,
        "reason": "heavy-scored 80 of 200 candidates within 9.00 ms",
        "details": {"scored": 80.0},
    },
    {"stage": "rerank", "elapsed_ms": 0.4},
]


def test_stage_reports_are_attributed_to_their_service() -> None:
    sample = stage_figures(STAGES, {"admission": 3.0, "retrieval": 4.0, "ranking": 12.0})
    assert sample.stage_ms["retrieval.user_features"] == 2.0
    assert sample.stage_ms["ranking.user_features"] == 0.01
    assert sample.stage_ms["ranking.heavy"] == 9.0
    assert sample.stage_ms["gateway.ranking"] == 12.0
    assert sample.scored == 80.0
    assert (sample.cache_hits, sample.considered) == (450.0, 600.0)
    assert sample.reasons == {"ranking.heavy": "heavy-scored 80 of 200 candidates within 9.00 ms"}


def test_ranking_stages_are_recognised_when_retrieval_reported_fewer() -> None:
    sample = stage_figures(STAGES[1:], {})
    assert "retrieval.user_features" not in sample.stage_ms
    assert sample.stage_ms["ranking.user_features"] == 0.01


def test_summary_and_report() -> None:
    samples = []
    for i in range(100):
        sample = stage_figures(STAGES, {"admission": 3.0})
        sample.e2e_ms = float(i + 1)
        sample.items = 10
        sample.degraded = ["heavy"]
        samples.append(sample)
    samples.append(Sample(ok=False, status="DEADLINE_EXCEEDED", e2e_ms=15.0))
    summary = summarise(Phase("grpc-15ms", "grpc", 50, 2, 15), samples, 2.0)
    assert (summary.sent, summary.ok) == (101, 100)
    assert summary.errors == {"DEADLINE_EXCEEDED": 1}
    assert summary.e2e[0] == 50.5
    assert summary.stages["ranking.heavy"][0] == 9.0
    assert summary.cache_hit_rate == 0.75
    assert summary.reasons == {"ranking.heavy: heavy-scored": 100}
    report = to_markdown(
        [summary],
        {"started": "now", "startup_s": 5.0, "warmup_s": 1.0, "artifacts": "tiny", "load": "1"},
        "python -m loadtest.bench --rate 50",
        {
            "cpu": "cpu",
            "memory": "1 GiB",
            "os": "os",
            "python": "3.11",
            "libraries": "x",
            "commit": "c",
        },
    )
    assert "python -m loadtest.bench --rate 50" in report
    assert "| ranking.heavy | 9.00 | 9.00 | 100 |" in report
    assert "DEADLINE_EXCEEDED 1" in report
    assert "`heavy` 100.0 %" in report
