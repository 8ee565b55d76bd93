"""What a chaos run observed, and its per-second aggregation. Pure functions, no I/O.

Four streams are recorded while the suite runs, and one check at its end:

* :class:`Request` — one per HTTP request the load generator sent (``chaos.load``);
* :class:`loadtest.ingest.Post` — one per ``POST /v1/events`` of the ingest (``chaos.ingest``);
* :class:`Sample` — the gateway's ``/metrics`` scraped twice a second (breaker states,
  downstream attempts and retries, recommend requests counted by the gateway, outbox depth);
* :class:`HealthSample` — every process's ``grpc.health.v1`` status once a second;
* :class:`GroupSample` — the projector's consumer group on the tenant's log, twice a second;
* :class:`ProjectorCheck` — once the load stopped: the projector caught up, and its
  projections compared with a recount from the log.

:func:`seconds` turns them into one :class:`Second` per wall-clock second of a window;
:func:`increase` and :func:`max_in_flight` give window totals.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BREAKER_OPEN = 2.0
"""``recmesh_breaker_state`` of an open breaker (0 closed, 1 half-open)."""


@dataclass(frozen=True)
class Request:
    """One request of the load generator (see ``chaos.load`` for the record format)."""

    kind: str
    t: float
    ms: float
    status: int
    error: str
    degraded: tuple[str, ...] = ()
    request_id: str = ""
    items: int = 0
    event_id: str = ""

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> Request:
        return cls(
            kind=str(record["k"]),
            t=float(record["t"]),
            ms=float(record["ms"]),
            status=int(record["s"]),
            error=str(record.get("e", "")),
            degraded=tuple(record.get("d", ())),
            request_id=str(record.get("r", "")),
            items=int(record.get("n", 0)),
            event_id=str(record.get("id", "")),
        )

    @property
    def ok(self) -> bool:
        """An answer arrived with a success status."""
        return not self.error and 200 <= self.status < 300

    def answered(self, deadline_ms: float) -> bool:
        """A successful answer that arrived within the deadline."""
        return self.ok and self.ms <= deadline_ms


@dataclass(frozen=True)
class Sample:
    """One scrape of the gateway's ``/metrics`` (``up`` False when it did not answer).

    ``cpu_busy_s`` is the host's busy CPU time so far and ``cpu_ours_s`` the part of it
    spent by the mesh, the load generator and the driver (both cumulative, any origin):
    their difference is what other processes on the machine took. ``latency_buckets`` is
    the gateway's own latency histogram of HTTP recommendations (``le`` -> count).
    """

    t: float
    up: bool
    breaker: Mapping[str, float] = field(default_factory=dict)
    opened: Mapping[str, float] = field(default_factory=dict)
    attempts: Mapping[str, float] = field(default_factory=dict)
    retries: Mapping[str, float] = field(default_factory=dict)
    rejected: Mapping[str, float] = field(default_factory=dict)
    requests: float = 0.0
    outbox: float = 0.0
    load1: float = 0.0
    cpu_busy_s: float = 0.0
    cpu_ours_s: float = 0.0
    latency_buckets: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthSample:
    """Every process's health status at ``t`` (``SERVING``, ``NOT_SERVING``, ``UNREACHABLE``)."""

    t: float
    status: Mapping[str, str]


@dataclass(frozen=True)
class GroupSample:
    """The projector's consumer group on the tenant's log at ``t``, read from Redis
    (``XINFO GROUPS``, ``XLEN``); ``up`` False when Redis did not answer (fields None).

    ``lag`` is the entries the group has not read yet (what the projector's
    ``recmesh_projector_lag_events`` gauge publishes, read here so it is seen while the
    projector is down), ``pending`` the entries read and not acknowledged (a killed
    consumer's, until they are claimed), ``length`` the entries in the log.
    """

    t: float
    up: bool
    lag: int | None = None
    pending: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class ProjectorCheck:
    """The end-of-run check of the projections (``chaos.observe.check_projections``).

    Attributes:
        caught_up: the group read and acknowledged every entry of the log (lag 0, nothing
            pending) within the wait; only then were the projections compared.
        waited_s: how long the wait took.
        lag: entries not read when the wait ended.
        pending: entries read and not acknowledged when the wait ended.
        entries: entries in the log.
        difference_count: differences ``services.projector.batch.verify`` found (0: the
            live projections equal a recount from the log).
        differences: the first of them, as it words them.
    """

    caught_up: bool
    waited_s: float
    lag: int | None
    pending: int | None
    entries: int
    difference_count: int
    differences: list[str] = field(default_factory=list)

    @property
    def verified(self) -> int | None:
        """The differences found, or None when the projector never caught up (no verdict)."""
        return self.difference_count if self.caught_up else None


@dataclass
class Second:
    """Aggregates of one second; ``t`` is its start relative to the scenario's fault."""

    t: float
    requests: int = 0
    answered_pct: float | None = None
    error_pct: float | None = None
    late_pct: float | None = None
    degraded_pct: float | None = None
    stage_pct: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    breaker: dict[str, float] = field(default_factory=dict)
    outbox: float | None = None
    serving: bool | None = None
    other_cpu_pct: float | None = None
    stall_ms: float | None = None
    clicks_accepted: int = 0
    clicks_failed: int = 0
    lag: int | None = None
    pending: int | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _pct(part: int, whole: int) -> float | None:
    return None if whole == 0 else 100.0 * part / whole


def in_window(requests: Iterable[Request], t0: float, t1: float, kind: str) -> list[Request]:
    """Requests of ``kind`` that started in ``[t0, t1)``."""
    return [r for r in requests if r.kind == kind and t0 <= r.t < t1]


def seconds(
    requests: Sequence[Request],
    samples: Sequence[Sample],
    health: Sequence[HealthSample],
    t0: float,
    t1: float,
    origin: float,
    deadline_ms: float,
    stages: Iterable[str] = (),
    stalls: Mapping[int, float] | None = None,
    group: Sequence[GroupSample] = (),
) -> list[Second]:
    """One :class:`Second` for each second of ``[t0, t1)``, stamped relative to ``origin``.

    ``stage_pct`` is the share of successful answers that name one of ``stages`` in
    ``degraded``; ``degraded_pct`` counts any stage. ``late_pct`` is the share of
    successful answers slower than the deadline, ``error_pct`` the share without a
    successful answer. A breaker's value is the worst state seen in the second.
    ``stalls`` maps a wall-clock second to the scheduling canary's worst oversleep in it.
    ``lag`` and ``pending`` are the largest of the second's ``group`` samples.
    """
    wanted = set(stages)
    count = max(0, math.ceil(t1 - t0))
    out = [Second(t=round(t0 + i - origin, 3)) for i in range(count)]

    def slot(t: float) -> int | None:
        index = math.floor(t - t0)
        return index if 0 <= index < count else None

    recs: list[list[Request]] = [[] for _ in range(count)]
    for request in requests:
        index = slot(request.t)
        if index is None:
            continue
        if request.kind == "rec":
            recs[index].append(request)
        elif request.ok:
            out[index].clicks_accepted += 1
        else:
            out[index].clicks_failed += 1
    for second, batch in zip(out, recs, strict=True):
        ok = [r for r in batch if r.ok]
        second.requests = len(batch)
        second.answered_pct = _pct(sum(r.answered(deadline_ms) for r in batch), len(batch))
        second.error_pct = _pct(len(batch) - len(ok), len(batch))
        second.late_pct = _pct(sum(r.ms > deadline_ms for r in ok), len(ok))
        second.degraded_pct = _pct(sum(bool(r.degraded) for r in ok), len(ok))
        second.stage_pct = _pct(sum(bool(wanted & set(r.degraded)) for r in ok), len(ok))
        latencies = [r.ms for r in batch if r.ok]
        second.p50_ms = percentile(latencies, 50)
        second.p99_ms = percentile(latencies, 99)
        second.max_ms = max(latencies) if latencies else None
    for sample in samples:
        index = slot(sample.t)
        if index is None or not sample.up:
            continue
        second = out[index]
        for name, state in sample.breaker.items():
            second.breaker[name] = max(second.breaker.get(name, 0.0), state)
        second.outbox = max(second.outbox or 0.0, sample.outbox)
    for index, share in enumerate(other_cpu(samples, t0 + i, t0 + i + 1) for i in range(count)):
        out[index].other_cpu_pct = share
    if stalls:
        for index in range(count):
            # A second of the timeline straddles two wall-clock seconds: take the worse.
            start = math.floor(t0 + index)
            values = [stalls[k] for k in (start, start + 1) if k in stalls]
            out[index].stall_ms = max(values) if values else None
    for observed in group:
        index = slot(observed.t)
        if index is None or not observed.up:
            continue
        second = out[index]
        if observed.lag is not None:
            second.lag = max(second.lag or 0, observed.lag)
        if observed.pending is not None:
            second.pending = max(second.pending or 0, observed.pending)
    for check in health:
        index = slot(check.t)
        if index is None:
            continue
        serving = all(s == "SERVING" for s in check.status.values())
        previous = out[index].serving
        out[index].serving = serving if previous is None else previous and serving
    return out


def increase(points: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """How much a counter grew over ``[t0, t1]``, counting a drop as a restart from zero.

    ``points`` are ``(time, value)`` in time order; the value in force at ``t0`` is the
    last point at or before it (the first point when none is).
    """
    inside = [(t, v) for t, v in points if t0 < t <= t1]
    before = [v for t, v in points if t <= t0]
    if not inside:
        return 0.0
    previous = before[-1] if before else inside[0][1]
    total = 0.0
    for _, value in inside:
        total += value - previous if value >= previous else value
        previous = value
    return total


def series(
    samples: Sequence[Sample], metric: str, key: str | None = None
) -> list[tuple[float, float]]:
    """``(t, value)`` of one counter or gauge from the scrapes that answered."""
    points = []
    for sample in samples:
        if not sample.up:
            continue
        value = getattr(sample, metric)
        if key is not None:
            value = value.get(key, 0.0)
        points.append((sample.t, float(value)))
    return points


def other_cpu(
    samples: Sequence[Sample], t0: float, t1: float, cpus: int = 0, everyone: bool = False
) -> float | None:
    """Share (%) of the host's CPU capacity used by other processes over ``[t0, t1]``
    (by every process, the mesh's included, with ``everyone``).

    Taken between the last sample at or before ``t0`` and the last one at or before ``t1``;
    ``cpus`` defaults to this machine's count. None without two samples.
    """
    first = [s for s in samples if s.t <= t0]
    last = [s for s in samples if s.t <= t1]
    if not first or not last or last[-1].t <= first[-1].t:
        return None
    a, b = first[-1], last[-1]
    capacity = (b.t - a.t) * (cpus or os.cpu_count() or 1)
    used = b.cpu_busy_s - a.cpu_busy_s
    if not everyone:
        used -= b.cpu_ours_s - a.cpu_ours_s
    return max(0.0, min(100.0, 100.0 * used / capacity))


def stalled(request: Request, stalls: Mapping[int, float], threshold_ms: float) -> bool:
    """Whether the host stalled (canary oversleep >= ``threshold_ms``) while ``request``
    was open."""
    first, last = math.floor(request.t), math.floor(request.t + request.ms / 1000.0)
    return any(stalls.get(k, 0.0) >= threshold_ms for k in range(first, last + 1))


def max_in_flight(requests: Iterable[Request], t0: float, t1: float) -> int:
    """Most requests open at once, among those that started in ``[t0, t1)``."""
    edges: list[tuple[float, int]] = []
    for request in requests:
        if t0 <= request.t < t1:
            edges.append((request.t, 1))
            edges.append((request.t + request.ms / 1000.0, -1))
    edges.sort()
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak
