"""The figures of each scenario, computed from the run's observations. Pure functions.

:mod:`chaos.bars` judges them and :mod:`chaos.render` writes them out.

Definitions (also written into the Markdown report):

* **answered** — an HTTP 200 that reached the client within the gateway's deadline;
  the share is over every recommendation request started in the scenario's window
  (fault injected → end of the recovery period).
* **gateway-side ≤ deadline** — the same share from the gateway's latency histogram
  (``recmesh_gateway_request_seconds``, whose bucket bounds include 100 ms): time from
  handler start to answer, without the client's or the kernel's queueing. A gap between
  the two columns is time spent outside the gateway's handler (accept queue, event-loop
  lag, the load generator's own scheduling).
* **retry amplification** — attempts the gateway sent to a downstream ÷ recommendation
  requests the gateway counted, over the window (``recmesh_downstream_attempts_total`` and
  ``recmesh_gateway_requests_total`` from ``/metrics``); the bar takes the largest over the
  downstreams on the request path (quota, experiment, retrieval, ranking).
* **events lost** — clicks answered 202 during the scenario whose id is not in the events
  service's log at the end of the run (read back with ``EventService.Read``).
* **time to recover** — from the start of the repair to the first of three consecutive
  seconds in which no request failed, the fault's stages were degraded in at most
  max(10 %, twice the baseline share) of answers, the breaker in front of the target was
  closed, every process was SERVING and the outbox was back to its usual depth.
* **drain errors** (SIGTERM) — requests open at any moment between the SIGTERM and the
  gateway's exit that got no successful answer; connections refused once it stopped
  listening are counted apart (one gateway, no load balancer to route around it), and
  failures after the restart show in the scenario's failed requests.
* **host stall** — a second in which the suite's scheduling canary (a process that
  sleeps 10 ms in a loop) woke at least 20 ms late: every runnable process on the host,
  the mesh's included, was kept waiting for a CPU. Requests not answered in time that were
  open during such a second are counted apart, as evidence of where the time went. The
  canary under-reports: the scheduler favours a process that mostly sleeps.
* **CPU taken by other processes** — the host's busy CPU time minus that of the mesh, the
  load generator and the suite, as a share of all CPUs; **host CPU busy** counts every
  process. The machine is shared: at 100 % busy the mesh only gets what the scheduler
  leaves it, and latency bars are only as good as that.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from chaos.scenarios import Scenario
from chaos.timeline import (
    BREAKER_OPEN,
    HealthSample,
    Request,
    Sample,
    Second,
    in_window,
    increase,
    max_in_flight,
    other_cpu,
    percentile,
    seconds,
    series,
    stalled,
)

REQUEST_PATH = ("quota", "experiment", "retrieval", "ranking")
"""Downstreams the gateway calls once per recommendation."""

STEADY_SECONDS = 3
STALL_MS = 20.0
"""A 10-ms sleep that wakes this much late marks a host scheduling stall."""


@dataclass(frozen=True)
class Marks:
    """When each phase of a scenario began (wall-clock seconds)."""

    start: float
    fault: float
    recover: float
    recovered: float
    end: float


@dataclass
class Figures:
    """What one scenario measured; times in seconds, latencies in milliseconds."""

    requests: int = 0
    answered_pct: float | None = None
    non_ok_pct: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    degraded_pct: float | None = None
    stage_pct: float | None = None
    baseline_answered_pct: float | None = None
    gateway_within_deadline_pct: float | None = None
    baseline_p99_ms: float | None = None
    baseline_stage_pct: float | None = None
    breaker_opened: bool | None = None
    time_to_open_s: float | None = None
    breaker_closed_s: float | None = None
    repair_s: float = 0.0
    time_to_recover_s: float | None = None
    amplification: dict[str, float | None] = field(default_factory=dict)
    max_amplification: float | None = None
    retries: dict[str, float] = field(default_factory=dict)
    max_in_flight: int = 0
    clicks_sent: int = 0
    clicks_accepted: int = 0
    clicks_stored: int = 0
    events_lost: int | None = None
    duplicates_stored: int = 0
    outbox_peak: float | None = None
    outbox_drain_s: float | None = None
    drain_errors: int | None = None
    refused: int = 0
    load1_mean: float | None = None
    other_cpu_pct: float | None = None
    baseline_other_cpu_pct: float | None = None
    host_busy_pct: float | None = None
    max_stall_ms: float | None = None
    not_answered: int = 0
    not_answered_in_stalls: int = 0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _steady(second: Second, scenario: Scenario, stage_limit: float, outbox_limit: float) -> bool:
    if second.requests == 0 or (second.error_pct or 0.0) > 0.0:
        return False
    if scenario.stages and (second.stage_pct or 0.0) > stage_limit:
        return False
    if scenario.downstream and second.breaker.get(scenario.downstream, 0.0) > 0.0:
        return False
    if second.serving is False:
        return False
    return second.outbox is None or second.outbox <= outbox_limit


def recovery_time(
    timeline: Sequence[Second],
    repair_at: float,
    scenario: Scenario,
    stage_limit: float,
    outbox_limit: float,
) -> float | None:
    """Seconds from ``repair_at`` (relative to the fault) to the first of
    :data:`STEADY_SECONDS` steady seconds; None when the window never settles."""
    run = 0
    for index, second in enumerate(timeline):
        if second.t + 1.0 <= repair_at:
            continue
        run = run + 1 if _steady(second, scenario, stage_limit, outbox_limit) else 0
        if run == STEADY_SECONDS:
            first = timeline[index - STEADY_SECONDS + 1]
            return max(0.0, first.t - repair_at)
    return None


def within(samples: Sequence[Sample], deadline_ms: float, t0: float, t1: float) -> float | None:
    """Share (%) of recommendations the gateway's own histogram saw finish within the
    deadline over ``[t0, t1]``; None unless the deadline is one of its bucket bounds."""
    keys = {k for s in samples for k in s.latency_buckets}
    bound = next(
        (k for k in keys if k != "+Inf" and abs(float(k) * 1000 - deadline_ms) < 1e-6), None
    )
    if bound is None:
        return None
    inside = increase([(s.t, s.latency_buckets.get(bound, 0.0)) for s in samples if s.up], t0, t1)
    total = increase([(s.t, s.latency_buckets.get("+Inf", 0.0)) for s in samples if s.up], t0, t1)
    return 100.0 * inside / total if total else None


def outbox_limit(samples: Sequence[Sample], t0: float, t1: float) -> float:
    """The outbox depth counted as drained: twice the baseline peak, at least 50 rows."""
    peak = max((s.outbox for s in samples if s.up and t0 <= s.t < t1), default=0.0)
    return max(50.0, 2.0 * peak)


def compute(
    scenario: Scenario,
    marks: Marks,
    requests: Sequence[Request],
    samples: Sequence[Sample],
    health: Sequence[HealthSample],
    stored: Mapping[str, int] | None,
    deadline_ms: float,
    stalls: Mapping[int, float] | None = None,
) -> tuple[Figures, list[Second]]:
    """The figures of one scenario and its per-second timeline (baseline included).

    ``stored`` counts each click id found in the event log (None: not read back);
    ``stalls`` is the scheduling canary's worst oversleep per wall-clock second.
    """
    f = Figures()
    window = in_window(requests, marks.fault, marks.end, "rec")
    base = in_window(requests, marks.start, marks.fault, "rec")
    ok = [r for r in window if r.ok]
    f.requests = len(window)
    if window:
        f.answered_pct = 100.0 * sum(r.answered(deadline_ms) for r in window) / len(window)
        f.non_ok_pct = 100.0 * (len(window) - len(ok)) / len(window)
    f.errors = dict(collections.Counter(r.error or str(r.status) for r in window if not r.ok))
    latencies = [r.ms for r in ok]
    f.p50_ms, f.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
    f.max_ms = max(latencies, default=None)
    stages = set(scenario.stages)
    if ok:
        f.degraded_pct = 100.0 * sum(bool(r.degraded) for r in ok) / len(ok)
        f.stage_pct = 100.0 * sum(bool(stages & set(r.degraded)) for r in ok) / len(ok)
    base_ok = [r for r in base if r.ok]
    if base:
        f.baseline_answered_pct = 100.0 * sum(r.answered(deadline_ms) for r in base) / len(base)
        f.baseline_p99_ms = percentile([r.ms for r in base_ok], 99)
    if base_ok:
        hits = sum(bool(stages & set(r.degraded)) for r in base_ok)
        f.baseline_stage_pct = 100.0 * hits / len(base_ok)

    ds = scenario.downstream
    if ds is not None:
        opened = series(samples, "opened", ds)
        at_fault = [v for t, v in opened if t <= marks.fault]
        before = at_fault[-1] if at_fault else 0.0
        first_open = next(
            (
                s.t
                for s in samples
                if s.up
                and marks.fault <= s.t <= marks.end
                and (s.breaker.get(ds, 0.0) >= BREAKER_OPEN or s.opened.get(ds, 0.0) > before)
            ),
            None,
        )
        f.breaker_opened = first_open is not None
        f.time_to_open_s = None if first_open is None else first_open - marks.fault
        if f.breaker_opened:
            closed = next(
                (
                    s.t
                    for s in samples
                    if s.up and marks.recovered <= s.t <= marks.end and s.breaker.get(ds) == 0.0
                ),
                None,
            )
            f.breaker_closed_s = None if closed is None else max(0.0, closed - marks.recovered)

    f.gateway_within_deadline_pct = within(samples, deadline_ms, marks.fault, marks.end)
    gateway_requests = increase(series(samples, "requests"), marks.fault, marks.end)
    for name in REQUEST_PATH:
        attempts = increase(series(samples, "attempts", name), marks.fault, marks.end)
        f.amplification[name] = attempts / gateway_requests if gateway_requests else None
        f.retries[name] = increase(series(samples, "retries", name), marks.fault, marks.end)
    measured = [v for v in f.amplification.values() if v is not None]
    f.max_amplification = max(measured) if measured else None
    f.max_in_flight = max_in_flight(requests, marks.fault, marks.end)

    clicks = in_window(requests, marks.start, marks.end, "evt")
    accepted = {r.event_id for r in clicks if r.ok}
    f.clicks_sent, f.clicks_accepted = len(clicks), len(accepted)
    if stored is not None:
        f.clicks_stored = sum(1 for i in accepted if stored.get(i, 0) > 0)
        f.events_lost = len(accepted) - f.clicks_stored
        f.duplicates_stored = sum(stored.get(i, 0) - 1 for i in accepted if stored.get(i, 0) > 1)

    limit = outbox_limit(samples, marks.start, marks.fault)
    depths = [s for s in samples if s.up and marks.fault <= s.t <= marks.end]
    f.outbox_peak = max((s.outbox for s in depths), default=None)
    if f.outbox_peak is not None and f.outbox_peak > limit:
        drained = next((s.t for s in depths if s.t >= marks.recovered and s.outbox <= limit), None)
        f.outbox_drain_s = None if drained is None else drained - marks.recovered

    if scenario.action == "term":
        f.refused = sum(r.error == "refused" for r in requests if marks.fault <= r.t < marks.end)
        # The drain: requests open at any moment between the SIGTERM and the exit.
        draining = [r for r in requests if r.t < marks.recover and r.t + r.ms / 1000 > marks.fault]
        f.drain_errors = sum(not r.ok and r.error != "refused" for r in draining)
    f.repair_s = marks.recovered - marks.recover
    loads = [s.load1 for s in samples if s.up and marks.fault <= s.t <= marks.end]
    f.load1_mean = _mean(loads)
    f.other_cpu_pct = other_cpu(samples, marks.fault, marks.end)
    f.baseline_other_cpu_pct = other_cpu(samples, marks.start, marks.fault)
    f.host_busy_pct = other_cpu(samples, marks.fault, marks.end, everyone=True)
    missed = [r for r in window if not r.answered(deadline_ms) and r.error != "refused"]
    f.not_answered = len(missed)
    if stalls:
        inside = [v for k, v in stalls.items() if marks.fault - 1 <= k < marks.end]
        f.max_stall_ms = max(inside, default=None)
        f.not_answered_in_stalls = sum(stalled(r, stalls, STALL_MS) for r in missed)

    timeline = seconds(
        requests,
        samples,
        health,
        marks.start,
        marks.end,
        marks.fault,
        deadline_ms,
        scenario.stages,
        stalls,
    )
    f.time_to_recover_s = recovery_time(
        timeline, marks.recover - marks.fault, scenario, stage_limit(f.baseline_stage_pct), limit
    )
    return f, timeline


def stage_limit(baseline_stage_pct: float | None) -> float:
    """The share of answers degraded by the fault's stages that still counts as steady."""
    return max(10.0, 2.0 * (baseline_stage_pct or 0.0))


def recovered_after(
    scenario: Scenario,
    marks: Marks,
    requests: Sequence[Request],
    samples: Sequence[Sample],
    health: Sequence[HealthSample],
    deadline_ms: float,
) -> float | None:
    """Time to recover, judged on what was seen until ``marks.end`` (the run uses it live
    to end a scenario once it has recovered)."""
    base_ok = [r for r in in_window(requests, marks.start, marks.fault, "rec") if r.ok]
    stages = set(scenario.stages)
    baseline = (
        100.0 * sum(bool(stages & set(r.degraded)) for r in base_ok) / len(base_ok)
        if base_ok
        else None
    )
    timeline = seconds(
        requests, samples, health, marks.start, marks.end, marks.fault, deadline_ms, stages
    )
    return recovery_time(
        timeline,
        marks.recover - marks.fault,
        scenario,
        stage_limit(baseline),
        outbox_limit(samples, marks.start, marks.fault),
    )
