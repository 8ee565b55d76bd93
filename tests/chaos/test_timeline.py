"""Per-second aggregation of the chaos suite's observations."""

from __future__ import annotations

import pytest

from chaos.timeline import (
    HealthSample,
    Request,
    Sample,
    increase,
    max_in_flight,
    other_cpu,
    percentile,
    seconds,
    series,
    stalled,
)

DEADLINE_MS = 100.0


def rec(t: float, ms: float = 20.0, status: int = 200, error: str = "", *degraded: str) -> Request:
    return Request("rec", t, ms, status, error, tuple(degraded))


def test_request_parses_the_load_generators_record() -> None:
    request = Request.parse(
        {"k": "rec", "t": 10.5, "ms": 12.0, "s": 200, "e": "", "d": ["ranking"], "r": "x", "n": 3}
    )
    assert request == Request("rec", 10.5, 12.0, 200, "", ("ranking",), "x", 3)
    assert request.ok and request.answered(DEADLINE_MS)
    assert not rec(0, ms=150).answered(DEADLINE_MS)
    assert not rec(0, status=0, error="refused").ok


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) is None


def test_seconds_aggregate_answers_latency_and_degradation() -> None:
    requests = [
        rec(100.1, 10),
        rec(100.2, 150),  # answered late
        rec(100.3, 20, 200, "", "ranking"),
        rec(100.4, 5, 0, "refused"),
        rec(101.5, 30, 200, "", "quota"),
        Request("evt", 101.6, 3.0, 202, "", event_id="a"),
        Request("evt", 101.7, 3.0, 0, "refused", event_id="b"),
    ]
    samples = [
        Sample(100.2, True, breaker={"ranking": 0.0}, outbox=10),
        Sample(100.7, True, breaker={"ranking": 2.0}, outbox=40),
        Sample(101.2, False),
    ]
    health = [
        HealthSample(100.5, {"ranking": "SERVING"}),
        HealthSample(101.5, {"ranking": "UNREACHABLE"}),
    ]
    first, second, third = seconds(
        requests, samples, health, 100.0, 103.0, 101.0, DEADLINE_MS, ("ranking",)
    )
    assert first.t == -1.0 and first.requests == 4
    assert first.answered_pct == pytest.approx(50.0)
    assert first.error_pct == pytest.approx(25.0)
    assert first.late_pct == pytest.approx(100 / 3)
    assert first.stage_pct == pytest.approx(100 / 3)
    assert first.p99_ms == 150.0 and first.max_ms == 150.0
    assert first.breaker == {"ranking": 2.0}, "the worst state of the second"
    assert first.outbox == 40 and first.serving is True
    assert second.requests == 1 and second.stage_pct == 0.0 and second.degraded_pct == 100.0
    assert (second.clicks_accepted, second.clicks_failed) == (1, 1)
    assert second.serving is False and second.breaker == {}, "a failed scrape adds nothing"
    assert third.requests == 0 and third.answered_pct is None and third.p50_ms is None


def test_increase_counts_a_drop_as_a_restart() -> None:
    points = [(0.0, 5.0), (1.0, 8.0), (2.0, 12.0), (3.0, 2.0), (4.0, 6.0)]
    assert increase(points, 1.0, 2.0) == 4.0
    assert increase(points, 0.5, 4.0) == 3.0 + 4.0 + 2.0 + 4.0
    assert increase(points, 10.0, 20.0) == 0.0


def test_series_skips_failed_scrapes() -> None:
    samples = [
        Sample(1.0, True, attempts={"ranking": 3.0}),
        Sample(2.0, False),
        Sample(3.0, True, attempts={}),
    ]
    assert series(samples, "attempts", "ranking") == [(1.0, 3.0), (3.0, 0.0)]


def test_max_in_flight_counts_overlapping_requests() -> None:
    requests = [rec(0.0, 500), rec(0.1, 100), rec(0.15, 100), rec(0.3, 100), rec(9.0, 100)]
    assert max_in_flight(requests, 0.0, 1.0) == 3
    assert max_in_flight([rec(0.0, 100), rec(0.1, 100)], 0.0, 1.0) == 1, "back to back"


def test_other_cpu_is_the_hosts_busy_time_minus_ours() -> None:
    samples = [
        Sample(0.0, True, cpu_busy_s=100.0, cpu_ours_s=10.0),
        Sample(1.0, False, cpu_busy_s=101.0, cpu_ours_s=10.5),
        Sample(2.0, True, cpu_busy_s=103.0, cpu_ours_s=11.0),
    ]
    assert other_cpu(samples, 0.0, 2.0, cpus=2) == pytest.approx(50.0)
    assert other_cpu(samples, 0.0, 2.0, cpus=2, everyone=True) == pytest.approx(75.0)
    assert other_cpu(samples, 0.5, 1.5, cpus=2) == pytest.approx(25.0), "CPU of a failed scrape"
    assert other_cpu(samples, 1.0, 2.0, cpus=2) == pytest.approx(75.0)
    assert other_cpu(samples, -2.0, -1.0, cpus=2) is None
    assert other_cpu(samples, 0.2, 0.8, cpus=2) is None, "both ends fall on one sample"


def test_stalls_mark_seconds_and_the_requests_open_in_them() -> None:
    stalls = {100: 0.5, 101: 45.0, 103: 25.0}
    timeline = seconds([], [], [], 100.5, 103.5, 100.5, DEADLINE_MS, stalls=stalls)
    assert [s.stall_ms for s in timeline] == [45.0, 45.0, 25.0]
    assert stalled(rec(100.9, 150), stalls, 20.0), "ends in a stalled second"
    assert not stalled(rec(100.2, 150), stalls, 20.0)
    assert not stalled(rec(102.2, 150), stalls, 20.0)
