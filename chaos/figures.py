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
* **in the log exactly once** — every event accepted during the scenario (the ingest's
  posts and the load's clicks answered 202, and the impressions of every answer, ``<request
  id>:<position>``) is in the tenant's log at the end of the run, counted by event id;
  *missing* counts the accepted ids not found, *duplicated* the extra copies of any id sent
  during the scenario (accepted or not).
* **projector lag** — entries of the tenant's log the projector's consumer group has not
  read (``XINFO GROUPS`` ``lag``, what ``recmesh_projector_lag_events`` publishes), read
  from Redis twice a second so it is seen while the projector is down. *Back to 0
  after* is from the end of the repair to the first sample with lag 0. *Left pending by
  the fault* are the entries read and not acknowledged while the fault held (a killed
  consumer's, the fewest seen from 1 s after the fault to the repair); *all acknowledged
  after* is from the fault to the first sample after the repair with nothing pending: a
  killed consumer's entries are claimed by a live one once idle for
  ``RECMESH_PROJECTOR_CLAIM_IDLE_S``.
* **projections = a recount from the log** — once the load stopped and the outbox
  drained, the suite waits until the projector's group has read and acknowledged every
  entry (lag 0, nothing pending), then runs ``services.projector.batch.verify``: every
  live projection (users' recent outcomes and category shares, items' decayed counters,
  the trending set) against the same rules recomputed from the whole log. It is one check
  of the whole run, so it covers the events of every scenario; an event applied twice
  shows as a counter above its recount.
* **time to recover** — from the start of the repair to the first of three consecutive
  seconds in which no request failed, the fault's stages were degraded in at most
  max(10 %, twice the baseline share) of answers, the breaker in front of the target was
  closed, every process was SERVING and the outbox was back to its usual depth (and, in
  the scenarios with the projections bar, the projector's lag at most max(50, twice its
  baseline peak)).
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from chaos.scenarios import Scenario
from chaos.timeline import (
    BREAKER_OPEN,
    GroupSample,
    HealthSample,
    ProjectorCheck,
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
from loadtest.ingest import Post

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


@dataclass(frozen=True)
class Evidence:
    """What the run learned about the event log and the projections.

    Attributes:
        posts: the ingest's posts (``chaos.ingest``).
        stored: event id -> copies in the tenant's log at the end of the run, every type
            (None: the log was not read back).
        group: the projector's consumer group, sampled during the run.
        check: the end-of-run check of the projections (None: not made).
    """

    posts: Sequence[Post] = ()
    stored: Mapping[str, int] | None = None
    group: Sequence[GroupSample] = ()
    check: ProjectorCheck | None = None


def exactly_once(
    accepted: Iterable[str], sent: Iterable[str], stored: Mapping[str, int]
) -> tuple[int, int]:
    """``(missing, duplicated)``: the ``accepted`` ids with no copy in the log, and the
    copies beyond the first of every id ``sent`` (accepted or not: a post that timed out
    may still have been stored, once)."""
    missing = sum(1 for i in set(accepted) if stored.get(i, 0) == 0)
    duplicated = sum(stored.get(i, 0) - 1 for i in set(sent) if stored.get(i, 0) > 1)
    return missing, duplicated


def impression_ids(requests: Iterable[Request]) -> list[str]:
    """The ids of the impressions the gateway logs for the successful answers among
    ``requests`` (``<request id>:<position>``)."""
    return [
        f"{r.request_id}:{i}" for r in requests if r.kind == "rec" and r.ok for i in range(r.items)
    ]


def lag_limit(group: Sequence[GroupSample], t0: float, t1: float) -> int:
    """The projector lag counted as caught up: twice the baseline peak, at least 50."""
    peak = max((g.lag or 0 for g in group if g.up and t0 <= g.t < t1), default=0)
    return max(50, 2 * peak)


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
    ingest_posts: int = 0
    ingest_accepted: int = 0
    events_expected: int = 0
    events_missing: int | None = None
    events_duplicated: int | None = None
    lag_peak: int | None = None
    lag_zero_s: float | None = None
    pending_held: int | None = None
    pending_cleared_s: float | None = None
    projections_differ: int | None = None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _steady(
    second: Second,
    scenario: Scenario,
    stage_limit: float,
    outbox_limit: float,
    lag_limit: int | None = None,
) -> bool:
    if second.requests == 0 or (second.error_pct or 0.0) > 0.0:
        return False
    if (
        scenario.projects
        and lag_limit is not None
        and (second.lag is None or second.lag > lag_limit)
    ):
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
    lag_limit: int | None = None,
) -> float | None:
    """Seconds from ``repair_at`` (relative to the fault) to the first of
    :data:`STEADY_SECONDS` steady seconds; None when the window never settles.
    ``lag_limit`` None: the projector's lag was not observed (not judged)."""
    run = 0
    for index, second in enumerate(timeline):
        if second.t + 1.0 <= repair_at:
            continue
        steady = _steady(second, scenario, stage_limit, outbox_limit, lag_limit)
        run = run + 1 if steady else 0
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
    evidence: Evidence | None = None,
) -> tuple[Figures, list[Second]]:
    """The figures of one scenario and its per-second timeline (baseline included).

    ``stored`` counts each click id found in the event log (None: not read back);
    ``stalls`` is the scheduling canary's worst oversleep per wall-clock second;
    ``evidence`` is what the run saw of the log and the projector (None: nothing).
    """
    evidence = evidence or Evidence()
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

    _log_figures(f, marks, clicks, requests, evidence)

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
        evidence.group,
    )
    f.time_to_recover_s = recovery_time(
        timeline,
        marks.recover - marks.fault,
        scenario,
        stage_limit(f.baseline_stage_pct),
        limit,
        lag_limit(evidence.group, marks.start, marks.fault) if evidence.group else None,
    )
    return f, timeline


def _log_figures(
    f: Figures,
    marks: Marks,
    clicks: Sequence[Request],
    requests: Sequence[Request],
    evidence: Evidence,
) -> None:
    """The figures of the event log and the projector (see the module docstring)."""
    posts = [p for p in evidence.posts if marks.start <= p.t < marks.end]
    f.ingest_posts = len(posts)
    f.ingest_accepted = sum(len(p.ids) for p in posts if p.ok)
    impressions = impression_ids(in_window(requests, marks.start, marks.end, "rec"))
    accepted = [i for p in posts if p.ok for i in p.ids]
    accepted += [r.event_id for r in clicks if r.ok] + impressions
    sent = [i for p in posts for i in p.ids] + [r.event_id for r in clicks] + impressions
    f.events_expected = len(set(accepted))
    if evidence.stored is not None:
        f.events_missing, f.events_duplicated = exactly_once(accepted, sent, evidence.stored)

    seen = [g for g in evidence.group if g.up and marks.fault <= g.t <= marks.end]
    f.lag_peak = max((g.lag for g in seen if g.lag is not None), default=None)
    # While the fault holds nobody acknowledges: what is pending then, at its lowest (a
    # batch in flight at the fault may still be acknowledged), is what the fault left
    # read and unacknowledged (a killed consumer's entries).
    held = [
        g.pending
        for g in seen
        if marks.fault + 1.0 <= g.t < marks.recover and g.pending is not None
    ]
    f.pending_held = min(held, default=None)
    zero = next((g.t for g in seen if g.t >= marks.recovered and g.lag == 0), None)
    f.lag_zero_s = None if zero is None else zero - marks.recovered
    if f.pending_held:
        # They are claimed after the claim idle time, which may be after the scenario
        # ended: look at every later sample of the run.
        cleared = next(
            (g.t for g in evidence.group if g.up and g.t >= marks.recovered and g.pending == 0),
            None,
        )
        f.pending_cleared_s = None if cleared is None else cleared - marks.fault
    if evidence.check is not None:
        f.projections_differ = evidence.check.verified


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
    group: Sequence[GroupSample] = (),
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
        requests,
        samples,
        health,
        marks.start,
        marks.end,
        marks.fault,
        deadline_ms,
        stages,
        group=group,
    )
    return recovery_time(
        timeline,
        marks.recover - marks.fault,
        scenario,
        stage_limit(baseline),
        outbox_limit(samples, marks.start, marks.fault),
        lag_limit(group, marks.start, marks.fault) if group else None,
    )
