"""Figures and bars of a scenario, computed from synthetic observations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos.bars import build
from chaos.figures import Evidence, Marks, exactly_once, recovered_after, recovery_time, within
from chaos.render import findings, to_json, to_markdown
from chaos.scenarios import Scenario, default_scenarios, select
from chaos.timeline import GroupSample, HealthSample, ProjectorCheck, Request, Sample, Second
from loadtest.ingest import Post

DEADLINE_MS = 100.0
MARKS = Marks(start=0.0, fault=5.0, recover=15.0, recovered=17.0, end=30.0)
RUN = {
    "started": "2026-01-01T00:00:00+00:00",
    "total_s": 30.0,
    "startup_s": 7.0,
    "host": "Linux x86_64, 2 CPUs",
    "cpus": 2,
    "rate": 25.0,
    "users": 50,
    "click_share": 0.2,
    "artifacts": "artifacts",
    "deadline_ms": DEADLINE_MS,
    "load1_mean": 1.0,
    "load1_max": 2.0,
    "events": {
        "clicks_accepted": 3,
        "clicks_stored": 2,
        "clicks_lost": 1,
        "duplicates": 1,
        "impressions_expected": 10,
        "impressions_stored": 10,
    },
}


def scenario(name: str) -> Scenario:
    return select(default_scenarios(10.0, 10.0), [name])[0]


def load(late_at: float | None = 20.0) -> list[Request]:
    """25 requests/s for 30 s; ranking degraded while it is down (5 s to 17 s)."""
    requests = []
    for i in range(750):
        t = i / 25
        degraded = ("ranking",) if MARKS.fault <= t < MARKS.recovered else ()
        ms = 150.0 if late_at is not None and t == late_at else 20.0
        requests.append(Request("rec", t, ms, 200, "", degraded, f"r{i}", 10))
    clicks = [("a", 6.0), ("b", 7.0), ("c", 8.0), ("z", 2.0)]
    requests += [Request("evt", t, 3.0, 202, "", event_id=i) for i, t in clicks]
    return requests


def samples(retrieval_factor: float = 1.0) -> list[Sample]:
    out = []
    for k in range(61):
        t = k / 2
        if t < MARKS.fault:
            ranking = 25 * t
        elif t < MARKS.recovered:
            ranking = 125 + 2 * (t - MARKS.fault)
        else:
            ranking = 149 + 25 * (t - MARKS.recovered)
        is_open = MARKS.fault + 0.5 <= t < MARKS.recovered + 0.5
        out.append(
            Sample(
                t,
                True,
                breaker={"ranking": 2.0 if is_open else 0.0, "quota": 0.0},
                opened={"ranking": 1.0 if t >= MARKS.fault + 0.5 else 0.0},
                attempts={
                    "quota": 25 * t,
                    "experiment": 25 * t,
                    "retrieval": 25 * t * retrieval_factor,
                    "ranking": ranking,
                },
                retries={"ranking": 3.0 if t > MARKS.fault else 0.0},
                requests=25 * t,
                outbox=10.0,
            )
        )
    return out


def health() -> list[HealthSample]:
    return [
        HealthSample(
            float(t),
            {"ranking": "UNREACHABLE" if MARKS.fault <= t < MARKS.recovered else "SERVING"},
        )
        for t in range(30)
    ]


STORED = {"a": 1, "b": 2, "z": 1}


def test_figures_of_a_killed_downstream() -> None:
    report = build(
        scenario("kill-ranking"), MARKS, load(), samples(), health(), STORED, DEADLINE_MS
    )
    f = report.figures
    assert f.requests == 625
    assert f.answered_pct == pytest.approx(100 * 624 / 625)
    assert f.non_ok_pct == 0.0 and f.errors == {}
    assert f.p99_ms == 20.0 and f.max_ms == 150.0
    assert f.stage_pct == pytest.approx(100 * 300 / 625)
    assert f.baseline_answered_pct == 100.0 and f.baseline_stage_pct == 0.0
    assert f.breaker_opened and f.time_to_open_s == pytest.approx(0.5)
    assert f.breaker_closed_s == pytest.approx(0.5)
    assert f.repair_s == pytest.approx(2.0)
    assert f.time_to_recover_s == pytest.approx(3.0)
    assert f.amplification["ranking"] == pytest.approx((24 + 25 * 13) / 625)
    assert f.max_amplification == pytest.approx(1.0)
    assert f.retries["ranking"] == 3.0
    assert (f.clicks_sent, f.clicks_accepted, f.clicks_stored) == (4, 4, 3)
    assert f.events_lost == 1 and f.duplicates_stored == 1
    assert f.outbox_peak == 10.0 and f.outbox_drain_s is None
    assert f.drain_errors is None


def test_requests_not_answered_in_time_are_matched_with_host_stalls() -> None:
    stalls = {t: 0.3 for t in range(30)} | {20: 60.0}
    report = build(
        scenario("kill-ranking"), MARKS, load(), samples(), health(), STORED, DEADLINE_MS, stalls
    )
    f = report.figures
    assert (f.not_answered, f.not_answered_in_stalls, f.max_stall_ms) == (1, 1, 60.0)
    assert (
        "1 of the 1 requests not answered in time were open while the host stalled"
        in (findings([report])[0])
    )


def test_bars_name_what_was_missed() -> None:
    report = build(
        scenario("kill-ranking"), MARKS, load(), samples(), health(), STORED, DEADLINE_MS
    )
    verdict = {bar.name: bar.passed for bar in report.bars}
    assert verdict == {
        "answered": False,  # 624 / 625 = 99.84 % < 99.9 %
        "p99": True,
        "opens": True,
        "closes": True,
        "lost": False,  # click "c" was accepted and never stored
        "amplification": True,
    }
    assert not report.passed
    lines = findings([report])
    assert len(lines) == 2
    assert lines[0].startswith("**kill-ranking**: answered within the deadline >= 99.9 % missed")
    assert "baseline before the fault 100.00 % answered" in lines[0]
    assert lines[1].endswith("events lost = 0 missed, measured 1 of 4 accepted clicks")
    sources = {bar.name: bar.source for bar in report.bars}
    assert sources["answered"] == "issue 5" and sources["p99"] == "reliability.md"

    clean = build(
        scenario("kill-ranking"),
        MARKS,
        load(late_at=None),
        samples(),
        health(),
        {"a": 1, "b": 1, "c": 1, "z": 1},
        DEADLINE_MS,
    )
    assert clean.passed, clean.bars


def test_amplification_bar_takes_the_worst_request_path_downstream() -> None:
    report = build(
        scenario("kill-ranking"), MARKS, load(), samples(1.3), health(), STORED, DEADLINE_MS
    )
    assert report.figures.max_amplification == pytest.approx(1.3)
    assert {b.name: b.passed for b in report.bars}["amplification"] is False


def test_unmeasurable_figures_are_not_counted_as_passed_or_failed() -> None:
    report = build(scenario("kill-ranking"), MARKS, load(), [], [], None, DEADLINE_MS)
    verdict = {bar.name: bar.passed for bar in report.bars}
    assert verdict["lost"] is None and verdict["amplification"] is None
    assert verdict["opens"] is False, "a breaker never seen open did not open"


def test_sigterm_counts_refused_connections_apart_from_drain_errors() -> None:
    marks = Marks(start=0.0, fault=5.0, recover=6.0, recovered=9.0, end=12.0)
    requests = [Request("rec", t / 10, 20.0, 200, "") for t in range(120)]
    requests += [
        Request("rec", 6.5, 1.0, 0, "refused"),
        Request("evt", 7.0, 1.0, 0, "refused", event_id="x"),
        Request("rec", 5.9, 30.0, 0, "reset"),  # open while the gateway drained
        Request("rec", 4.5, 900.0, 0, "timeout"),  # sent before the SIGTERM, still open
        Request("evt", 9.5, 2000.0, 0, "timeout", event_id="y"),  # after the restart
    ]
    report = build(scenario("term-gateway"), marks, requests, [], [], {}, DEADLINE_MS)
    assert report.figures.refused == 2
    assert report.figures.drain_errors == 2
    assert report.figures.errors == {"refused": 1, "reset": 1}, "recommendations of the window"
    assert {b.name: b.passed for b in report.bars}["drain"] is False


def test_recovery_needs_three_steady_seconds_after_the_repair() -> None:
    kill = scenario("kill-ranking")
    timeline = [
        Second(t=float(t), requests=10, error_pct=0.0, stage_pct=stage)
        for t, stage in enumerate([0, 100, 100, 0, 50, 0, 0, 0, 0, 0])
    ]
    assert recovery_time(timeline, 2.0, kill, 10.0, 50.0) == pytest.approx(3.0)
    assert recovery_time(timeline[:7], 2.0, kill, 10.0, 50.0) is None
    timeline[6].breaker = {"ranking": 1.0}
    assert recovery_time(timeline, 2.0, kill, 10.0, 50.0) == pytest.approx(5.0)


def test_reports_render_as_json_and_markdown() -> None:
    reports = [
        build(scenario(name), MARKS, load(), samples(), health(), STORED, DEADLINE_MS)
        for name in ("kill-ranking", "kill-events")
    ]
    run = RUN | {"findings": ["kill-ranking: answered missed"]}
    document = json.loads(json.dumps(to_json(reports, run)))
    assert document["passed"] is False
    assert [s["name"] for s in document["scenarios"]] == ["kill-ranking", "kill-events"]
    first = document["scenarios"][0]
    assert first["marks"] == {
        "start": -5.0,
        "fault": 0.0,
        "recover": 10.0,
        "recovered": 12.0,
        "end": 25.0,
    }
    assert len(first["timeline"]) == 30 and first["timeline"][0]["t"] == -5.0
    markdown = to_markdown(reports, run, {"kill-ranking": "chaos/kill-ranking.png"})
    assert "| [kill-ranking](#kill-ranking) | 99.84 %" in markdown
    assert "❌ answered, lost" in markdown
    assert "![kill-ranking timeline](chaos/kill-ranking.png)" in markdown
    assert "- **events lost** — clicks answered 202" in markdown


def test_a_timeline_png_is_drawn(tmp_path: Path) -> None:
    from chaos.plot import timeline_png

    report = build(
        scenario("kill-ranking"), MARKS, load(), samples(), health(), STORED, DEADLINE_MS
    )
    path = timeline_png(report, DEADLINE_MS, tmp_path / "kill-ranking.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_suite_covers_every_fault_of_the_issue() -> None:
    names = [s.name for s in default_scenarios()]
    assert names == [
        "kill-feature",
        "kill-retrieval",
        "kill-ranking",
        "kill-experiment",
        "kill-quota",
        "kill-events",
        "kill-projector",
        "stop-feature",
        "ranking-unavailable-50",
        "retrieval-latency-200ms",
        "redis-restart",
        "term-gateway",
    ]
    events = select(default_scenarios(20.0, 30.0), ["kill-events"])[0]
    assert events.fault_s == 30.0, "the events service stays down 30 s"
    assert all("answered" in s.bars for s in default_scenarios() if s.action == "kill")
    assert all({"lost", "amplification"} <= set(s.all_bars) for s in default_scenarios())
    projector_faults = [s.name for s in default_scenarios() if {"once", "verify"} <= set(s.bars)]
    assert projector_faults == ["kill-projector", "redis-restart"], "issue 13's two faults"
    with pytest.raises(ValueError, match="unknown scenario"):
        select(default_scenarios(), ["kill-nothing"])


def test_gateway_side_share_comes_from_the_histogram_bucket_at_the_deadline() -> None:
    def sample(t: float, fast: float, total: float) -> Sample:
        return Sample(t, True, latency_buckets={"0.05": fast / 2, "0.1": fast, "+Inf": total})

    samples = [sample(0.0, 10, 10), sample(1.0, 100, 110), sample(2.0, 5, 5), sample(3.0, 95, 105)]
    # 90 of 100 before the gateway restarted, then 5 of 5 and 90 of 100 after it.
    assert within(samples, 100.0, 0.0, 3.0) == pytest.approx(100 * 185 / 205)
    assert within(samples, 75.0, 0.0, 3.0) is None, "75 ms is no bucket bound"
    assert within(samples, 100.0, 5.0, 6.0) is None


def test_recovery_is_judged_live_on_what_was_seen_so_far() -> None:
    kill = scenario("kill-ranking")
    observed = load(late_at=None), samples(), health()
    so_far = Marks(MARKS.start, MARKS.fault, MARKS.recover, MARKS.recovered, 19.0)
    assert recovered_after(kill, so_far, *observed, DEADLINE_MS) is None
    assert recovered_after(kill, MARKS, *observed, DEADLINE_MS) == pytest.approx(3.0)


def test_exactly_once_counts_missing_accepted_ids_and_extra_copies_of_any_sent() -> None:
    stored = {"a": 1, "b": 2, "t": 2, "x": 1}
    # "c" was accepted and is missing; "b" is stored twice; "t" was sent (its post timed
    # out, so it was not accepted) and is stored twice; "x" was never sent by this window.
    assert exactly_once(["a", "b", "c", "c"], ["a", "b", "c", "t"], stored) == (1, 2)
    assert exactly_once([], [], stored) == (0, 0)


def evidence(stored: dict[str, int], check: ProjectorCheck | None) -> Evidence:
    """The log of one scenario: two ingest posts (the second timed out), the clicks and
    the ten impressions of each answer of :func:`load`, the projector's group killed at
    the fault and caught up 2 s after the repair."""
    posts = [
        Post(6.0, 4.0, 202, "", ("p1", "p2")),
        Post(9.0, 2000.0, 0, "timeout", ("p3",)),
    ]
    group = [
        GroupSample(t / 2, True, lag=0 if not 10 <= t < 38 else 400, pending=5 * (10 <= t < 50))
        for t in range(60)
    ]
    return Evidence(posts, stored, group, check)


def log_of(requests: list[Request], *extra: str) -> dict[str, int]:
    """Every event of ``requests`` stored once, plus ``extra`` copies."""
    stored = {f"{r.request_id}:{i}": 1 for r in requests if r.kind == "rec" for i in range(10)}
    stored |= {r.event_id: 1 for r in requests if r.kind == "evt"}
    stored |= {"p1": 1, "p2": 1}
    for event_id in extra:
        stored[event_id] = stored.get(event_id, 0) + 1
    return stored


CAUGHT_UP = ProjectorCheck(True, 1.0, 0, 0, 10_000, 0)


def test_the_log_bars_of_a_projector_scenario() -> None:
    requests = load(late_at=None)
    kill = scenario("kill-projector")
    clean = build(
        kill,
        MARKS,
        requests,
        samples(),
        health(),
        log_of(requests),
        DEADLINE_MS,
        evidence=evidence(log_of(requests), CAUGHT_UP),
    )
    f = clean.figures
    assert f.events_expected == 2 + 4 + 750 * 10, "accepted posts, clicks, impressions"
    assert (f.events_missing, f.events_duplicated) == (0, 0)
    assert (f.lag_peak, f.pending_held, f.pending_cleared_s) == (400, 5, 20.0)
    assert f.lag_zero_s == pytest.approx(2.0)
    assert {b.name: b.passed for b in clean.bars} == {
        "answered": True,
        "once": True,
        "verify": True,
        "lost": True,
        "amplification": True,
    }

    broken = log_of(requests, "r3:0", "p3", "p3")
    del broken["p2"]
    report = build(
        kill,
        MARKS,
        requests,
        samples(),
        health(),
        broken,
        DEADLINE_MS,
        evidence=evidence(broken, ProjectorCheck(True, 1.0, 0, 0, 10_000, 3, ["x"])),
    )
    bars = {b.name: b for b in report.bars}
    assert bars["once"].measured == 1 + 1 + 1 and not bars["once"].passed
    assert bars["verify"].measured == 3 and not bars["verify"].passed
    assert bars["once"].source == bars["verify"].source == "issue 13"
    lines = findings([report])
    assert ": 1 of 7506 accepted events missing, 2 extra copies" in lines[0]


def test_a_projector_that_never_caught_up_fails_the_projections_bar() -> None:
    requests = load(late_at=None)
    stored = log_of(requests)
    stuck = ProjectorCheck(False, 120.0, 12, 3, 10_000, 0)
    report = build(
        scenario("kill-projector"),
        MARKS,
        requests,
        samples(),
        health(),
        stored,
        DEADLINE_MS,
        evidence=evidence(stored, stuck),
    )
    verify = next(b for b in report.bars if b.name == "verify")
    assert verify.measured is None and verify.passed is False
    assert "never caught up" in findings([report])[0]
    unchecked = build(
        scenario("kill-projector"),
        MARKS,
        requests,
        samples(),
        health(),
        stored,
        DEADLINE_MS,
        evidence=evidence(stored, None),
    )
    assert next(b for b in unchecked.bars if b.name == "verify").passed is None
